"""Pixel-level decisions: pixel thresholds (quantile of good maps, F1-optimal on masks), predicted masks,
their outlines in overlays and the report, and pixel F1 on the generated demo data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crd_fast import CRDDetector
from crd_fast.data import MVTecAD
from crd_fast.evaluation.mvtec import evaluate_dataset
from crd_fast.features.preprocess import load_image
from crd_fast.postprocess import DetectionResult, pixel_f1, pixel_f1_threshold, pixel_quantile_threshold, predict_masks
from crd_fast.report import write_report
from crd_fast.report.overlay import PRED_COLOR, heatmap_overlay, mask_contour
from crd_fast.synthetic import generate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

#: Pixel F1 floors on the quick demo data (fabric, 128 px, seeded RANDOM resnet18 weights; measured 0.18 at
#: q = 0.999 and 0.26 F1-optimal). Random features give blurry maps, so the floors are modest but far above
#: the F1 of flagging every pixel (about 0.03 here: defects cover ~1.5 % of the pixels).
QUANTILE_F1_FLOOR = 0.12
OPTIMAL_F1_FLOOR = 0.2


def _brute_f1(maps, masks, t):
    pred, truth = maps >= t, masks
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def test_pixel_quantile_threshold(rng):
    maps = rng.normal(size=(3, 9, 7))
    assert pixel_quantile_threshold(maps, 0.9) == float(np.quantile(maps.reshape(-1), 0.9))
    assert pixel_quantile_threshold(maps, 1.0) == maps.max()
    with pytest.raises(ValueError, match="q must be"):
        pixel_quantile_threshold(maps, 2.0)
    with pytest.raises(ValueError, match="non-finite"):
        pixel_quantile_threshold(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        pixel_quantile_threshold(np.zeros(5))


@pytest.mark.parametrize("trial", range(4))
def test_pixel_f1_threshold_is_the_best_of_all_values(rng, trial):
    masks = np.zeros((3, 12, 10), dtype=bool)
    masks[:, 3:7, 2:5] = rng.random((3, 4, 3)) < 0.8
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    t = pixel_f1_threshold(maps, masks)
    best = max(_brute_f1(maps, masks, v) for v in np.unique(maps))
    assert _brute_f1(maps, masks, t) == pytest.approx(best, abs=1e-12)
    assert pixel_f1(predict_masks(maps, t), masks) == pytest.approx(best, abs=1e-12)
    with pytest.raises(ValueError, match="both defect and normal pixels"):
        pixel_f1_threshold(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_f1_threshold(maps, masks[:2])


def test_pixel_f1_counts():
    pred = np.array([[1, 1, 0, 0]], dtype=bool)
    truth = np.array([[1, 0, 1, 0]], dtype=bool)
    assert pixel_f1(pred, truth) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert pixel_f1(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert pixel_f1(np.zeros((2, 2)), np.ones((2, 2))) == 0.0


def test_detection_result_pred_masks(rng):
    maps = rng.random((2, 5, 6)).astype(np.float32)
    r = DetectionResult(maps.max(axis=(1, 2)).astype(np.float64), maps, maps, [None, None])
    assert r.apply_pixel_threshold(None).pred_masks is None
    r.apply_pixel_threshold(0.5)
    assert r.pixel_threshold == 0.5 and r.pred_masks.dtype == bool
    np.testing.assert_array_equal(r.pred_masks, maps >= 0.5)


def test_overlay_outlines_predicted_mask_in_its_own_colour():
    image = np.full((20, 20, 3), 100, dtype=np.uint8)
    amap = np.zeros((20, 20))
    gt, pred = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    gt[2:8, 2:8] = True
    pred[10:16, 10:18] = True
    out = heatmap_overlay(image, amap, vmin=0, vmax=1, alpha=0.0, mask=gt, pred_mask=pred)
    np.testing.assert_array_equal(out[mask_contour(pred)], np.tile(PRED_COLOR, (mask_contour(pred).sum(), 1)))
    assert (out[mask_contour(gt)] == 255).all()
    inside = pred & ~mask_contour(pred)
    assert (out[inside] == 100).all()  # only the outline is drawn
    with pytest.raises(ValueError, match="pred_mask shape"):
        heatmap_overlay(image, amap, pred_mask=pred[:5])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels") / "data"
    generate_dataset(root, categories=("fabric",), n_train=20, n_test_good=10, n_test_defect=12, size=128, seed=0)
    return root


def test_pixel_masks_on_demo_data(demo, tmp_path):
    det = CRDDetector(backbone="resnet18", weights="random", resize=128, crop=128, batch_size=8)
    train, test = MVTecAD(demo, "fabric", "train"), MVTecAD(demo, "fabric", "test")
    ev = evaluate_dataset(det, train, test, "fabric", progress=False, pixel_q=0.999)
    masks = test.masks(det.preprocess)
    assert det.pixel_threshold is not None
    quantile_f1 = ev.metrics["pixel_f1"]
    assert quantile_f1 >= QUANTILE_F1_FLOOR, quantile_f1
    assert quantile_f1 > 3 * pixel_f1(np.ones_like(masks), masks)  # far better than flagging everything

    pred = det.predict(test.image_paths, progress=False)
    np.testing.assert_array_equal(pred.pred_masks, pred.anomaly_maps >= det.pixel_threshold)
    assert pixel_f1(pred.pred_masks, masks) == quantile_f1

    # F1-optimal on the labelled masks: the best any threshold can do on this data, so at least the quantile's.
    raw_masks = [
        np.zeros((128, 128), bool) if y == 0 else m for y, m in zip(test.labels, [np.asarray(mm) for mm in masks])
    ]
    t = det.calibrate_pixels_labelled(test.image_paths, raw_masks, progress=False)
    best = pixel_f1(predict_masks(pred.anomaly_maps, t), masks)
    assert best >= OPTIMAL_F1_FLOOR and best >= quantile_f1

    # The pixel threshold is part of the model file, and missing in an old file means none.
    path = tmp_path / "m.crd"
    det.save(path)
    loaded = CRDDetector.load(path)
    assert loaded.pixel_threshold == t
    np.testing.assert_array_equal(
        loaded.predict(test.image_paths[:3], progress=False).pred_masks, pred.anomaly_maps[:3] >= t
    )

    # The report outlines the predicted masks and scores them.
    ev.result.images = {i: det.preprocess.display(load_image(p)) for i, p in enumerate(test.image_paths)}
    report = write_report(tmp_path / "report", [ev.result])
    cat = json.loads(report.json_path.read_text())["categories"][0]
    assert cat["metrics"]["pixel_threshold"] == pytest.approx(ev.result.pixel_threshold)
    assert cat["metrics"]["pixel_f1"] == pytest.approx(quantile_f1)
    assert "outlined in magenta" in report.html_path.read_text()
