"""Metrics: AUROCs on hand-checkable cases, AUPRO against a brute-force threshold sweep, F1-max, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from crd_fast.metrics import scores as M

# ---------------------------------------------------------------- image level


def test_image_auroc_hand_case():
    # pairs (defect, normal): (0.35 > 0.1) yes, (0.35 > 0.4) no, (0.8 > both) yes yes -> 3/4
    assert M.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.image_auroc([0, 1], [0.0, 1.0]) == 1.0
    assert M.image_auroc([1, 0], [0.0, 1.0]) == 0.0
    # ties count one half
    assert M.image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_image_auroc_accepts_bool_and_tensors():
    labels = torch.tensor([False, False, True, True])
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float32)
    assert M.image_auroc(labels, scores) == pytest.approx(0.75)


def test_f1_max_hand_case():
    # thresholds 0.3: P=1 R=2/3 F1=0.8; 0.15: P=3/4 R=1 F1=6/7 (best); 0.1: P=3/5 R=1 F1=0.75
    f1, thr = M.f1_max([0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.15])
    assert f1 == pytest.approx(6 / 7)
    assert thr == pytest.approx(0.15)


def test_f1_max_matches_brute_force():
    rng = np.random.default_rng(3)
    labels = rng.random(60) < 0.4
    scores = rng.normal(size=60) + labels
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    f1, thr = M.f1_max(labels, scores)
    assert f1 == pytest.approx(best)
    pred = scores >= thr
    tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(best)


def test_roc_points_thinning_keeps_end_points():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(500), np.ones(500)]
    scores = rng.normal(size=1000) + labels
    full = M.roc_points(labels, scores)
    thin = M.roc_points(labels, scores, max_points=20)
    assert len(thin["fpr"]) <= 20
    assert thin["fpr"][0] == full["fpr"][0] == 0.0 and thin["tpr"][-1] == full["tpr"][-1] == 1.0
    assert thin["thresholds"][0] is None  # sklearn's +inf start, JSON-safe
    assert np.trapezoid(full["tpr"], full["fpr"]) == pytest.approx(M.image_auroc(labels, scores))


# ---------------------------------------------------------------- pixel level


def test_pixel_auroc_hand_case():
    masks = np.zeros((2, 2, 2), dtype=np.uint8)
    masks[0, 0, 0] = 255  # one defect pixel, 0/255 mask as stored on disk
    maps = np.array([[[0.9, 0.1], [0.2, 0.3]], [[0.95, 0.0], [0.0, 0.0]]])
    # the defect pixel (0.9) beats 6 of the 7 normal pixels
    assert M.pixel_auroc(masks, maps) == pytest.approx(6 / 7)


def _brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float, structure: np.ndarray) -> float:
    """Every distinct score as a threshold, PRO and FPR recomputed from scratch, image by image."""
    regions = []  # (image index, boolean region mask)
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i] > 0, structure=structure)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        called = maps >= t
        fpr = (called & normal).sum() / normal.sum()
        pro = np.mean([(called[i] & r).sum() / r.sum() for i, r in regions])
        points.append((fpr, pro))
    # trapezoids up to fpr_limit, the last one cut at fpr_limit by linear interpolation
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, h, w = 4, 9, 11
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n - 1):  # the last image is defect-free
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    maps = rng.random((n, h, w)) + 0.6 * masks
    if seed % 2:  # quantised scores: many ties
        maps = np.round(maps * 8) / 8
    for limit in (0.3, 0.05, 1.0):
        expected = _brute_force_aupro(masks, maps, limit, np.ones((3, 3)))
        assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    cross = ndimage.generate_binary_structure(2, 1)
    assert M.aupro(masks, maps, connectivity=4) == pytest.approx(_brute_force_aupro(masks, maps, 0.3, cross), abs=1e-12)


def test_aupro_hand_cases():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, 0] = True  # small region
    masks[0, 3:6, 3:6] = True  # large region
    assert M.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert M.aupro(masks, 1.0 - masks) == pytest.approx(0.0)
    # only the small region scores high: PRO jumps to 1/2 at FPR 0 (each region weighs the same), then the
    # curve is the straight line to (1, 1): area up to 0.3 = 0.3 * (0.5 + 0.65) / 2, normalised by 0.3
    small_only = np.zeros((1, 6, 6))
    small_only[0, 0, 0] = 1.0
    assert M.aupro(masks, small_only) == pytest.approx((0.5 + 0.65) / 2)


def test_aupro_connectivity():
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 1, 0] = masks[0, 1, 1] = True  # a horizontal pair ...
    masks[0, 2, 2] = True  # ... and a diagonal neighbour: one region of 3 (8-conn) or regions of 2 and 1 (4-conn)
    maps = np.zeros((1, 5, 5))
    maps[0, 2, 2] = 1.0
    fpr8, pro8, thr8 = M.pro_curve(masks, maps, connectivity=8)
    fpr4, pro4, _ = M.pro_curve(masks, maps, connectivity=4)
    np.testing.assert_allclose(fpr8, [0, 0, 1])
    np.testing.assert_allclose(fpr4, [0, 0, 1])
    np.testing.assert_allclose(pro8, [0, 1 / 3, 1])
    np.testing.assert_allclose(pro4, [0, 1 / 2, 1])
    assert thr8[0] == np.inf and list(thr8[1:]) == [1.0, 0.0]
    # a region straddling images is never merged: the same pixel in two images gives two regions
    two = np.zeros((2, 3, 3), dtype=bool)
    two[:, 1, 1] = True
    mp = np.zeros((2, 3, 3))
    mp[0, 1, 1] = 1.0
    _, pro, _ = M.pro_curve(two, mp)
    assert pro[1] == pytest.approx(0.5)


def test_aupro_random_map_is_near_chance():
    # PRO ~ FPR for a map unrelated to the masks: area of x up to 0.3 is 0.045, normalised 0.15
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 64, 64), dtype=bool)
    masks[:10, 10:30, 20:40] = True
    assert M.aupro(masks, rng.random(masks.shape)) == pytest.approx(0.15, abs=0.02)


def test_evaluate_collects_everything():
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[3:, 4:9, 4:9] = True
    maps = rng.random(masks.shape) + masks
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    out = M.evaluate(labels, scores, masks, maps)
    assert out["image_auroc"] == M.image_auroc(labels, scores)
    assert out["pixel_auroc"] == M.pixel_auroc(masks, maps)
    assert out["aupro"] == M.aupro(masks, maps)
    assert (out["f1_max"], out["f1_threshold"]) == M.f1_max(labels, scores)
    no_pixels = M.evaluate(labels, scores)
    assert no_pixels["pixel_auroc"] is None and no_pixels["aupro"] is None


# ---------------------------------------------------------------- bad input


def test_bad_labels_and_scores():
    with pytest.raises(ValueError, match="no defective"):
        M.image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="no normal"):
        M.image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        M.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="must be 0 .normal. or 1"):
        M.f1_max([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite.*1 NaN"):
        M.image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        M.image_auroc([[0, 1]], [[0.1, 0.2]])


def test_bad_masks_and_maps():
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="differ in shape.*resize"):
        M.pixel_auroc(masks, maps[:, :3])
    with pytest.raises(ValueError, match="no defect pixels"):
        M.aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="no defect-free pixels"):
        M.pixel_auroc(np.ones_like(masks), maps)
    bad = maps.copy()
    bad[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="anomaly maps contains non-finite"):
        M.aupro(masks, bad)
    with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\]"):
        M.aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        M.aupro(masks, maps, connectivity=6)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        M.pixel_auroc(masks[None], maps[None])


def test_evaluate_curves_have_the_metrics_as_area():
    rng = np.random.default_rng(5)
    masks = np.zeros((8, 20, 20), dtype=bool)
    masks[4:, 5:12, 6:10] = True
    maps = rng.random(masks.shape) + 0.7 * masks
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2)) + 0.1 * rng.standard_normal(8)
    out = M.evaluate(labels, scores, masks, maps, curves=True, max_points=None)
    c = out["curves"]
    assert c["image_roc"]["auc"] == out["image_auroc"]
    assert np.trapezoid(c["pixel_roc"]["tpr"], c["pixel_roc"]["fpr"]) == pytest.approx(out["pixel_auroc"])
    assert c["pixel_roc"]["auc"] == out["pixel_auroc"] == M.pixel_auroc(masks, maps)
    fpr, pro = np.array(c["pro"]["fpr"]), np.array(c["pro"]["pro"])
    k = int(np.argmax(fpr > 0.3))  # first point past the limit; cut the segment before it at 0.3
    y_end = pro[k - 1] + (pro[k] - pro[k - 1]) * (0.3 - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
    x, y = np.r_[fpr[:k], 0.3], np.r_[pro[:k], y_end]
    assert np.trapezoid(y, x) / 0.3 == pytest.approx(out["aupro"])
    thin = M.evaluate(labels, scores, masks, maps, curves=True, max_points=50)["curves"]
    assert len(thin["pixel_roc"]["fpr"]) <= 50 and len(thin["pro"]["fpr"]) <= 50
    assert thin["pro"]["thresholds"][0] is None  # +inf start point, JSON-safe
