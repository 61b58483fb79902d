"""Label-free lam choice: the spectral reweighting against direct solves, mask gridding, the selection rule."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from crd_fast.core.lam_selection import SpectralForm, grid_masks, paired_auroc_difference, select_lam
from crd_fast.synthetic.pseudo import PSEUDO_DEFECTS, make_pseudo_defects


def test_spectral_scores_match_direct_solve_for_every_lam():
    g = torch.Generator().manual_seed(11)
    d = 12
    x = torch.randn(200, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]
    form = SpectralForm.from_covariance(cov, mu)
    y = torch.randn(7, d, generator=g, dtype=torch.float64) * 2
    z = form.rotate(y)
    for lam_rel in (1e-5, 1e-3, 0.1, 3.0):
        lam = lam_rel * float(torch.trace(cov)) / d
        direct = lam * torch.linalg.solve(cov + lam * torch.eye(d, dtype=torch.float64), (y - mu).T).T
        torch.testing.assert_close(
            form.scores(z, lam_rel), torch.linalg.vector_norm(direct, dim=1), rtol=1e-9, atol=1e-12
        )


def test_spectral_form_accepts_per_position_means():
    g = torch.Generator().manual_seed(12)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    form = SpectralForm.from_covariance(torch.eye(3, dtype=torch.float64) * 2, mu)
    y = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    lam = 0.5 * 2.0
    torch.testing.assert_close(
        form.scores(form.rotate(y), 0.5), torch.linalg.vector_norm((y - mu) * lam / (2 + lam), dim=-1)
    )


def test_grid_masks_marks_every_cell_a_defect_pixel_touches():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 5, 6] = True
    masks[1, 3:5, 3:5] = True
    cells = grid_masks(masks, (4, 4))
    expected = np.zeros((2, 4, 4), dtype=bool)
    expected[0, 0, 0] = expected[0, 2, 3] = True
    expected[1, 1:3, 1:3] = True
    np.testing.assert_array_equal(cells, expected)
    # non-multiple sizes: every pixel still lands in one cell, the last cell takes the remainder
    odd = np.zeros((1, 7, 7), dtype=bool)
    odd[0, 6, 6] = True
    assert grid_masks(odd, (3, 3))[0, 2, 2] and grid_masks(odd, (3, 3)).sum() == 1


def test_select_lam_picks_the_best_ranking_and_breaks_ties_downward():
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 2, 2), dtype=bool)
    masks[2, 0, 0] = masks[3, 1, 1] = True
    good = np.zeros((4, 2, 2))
    good[2, 0, 0] = good[3, 1, 1] = 5.0
    bad = np.zeros((4, 2, 2))
    bad[0, 0, 1] = bad[1, 1, 0] = 5.0  # clean images score higher than the defects

    sel = select_lam(
        lambda lam: good + 0.01 * np.arange(16).reshape(4, 2, 2) if lam == 1e-3 else bad,
        labels,
        masks,
        grid=(1e-4, 1e-3, 1e-2),
    )
    assert sel.choice == 1e-3
    assert sel.image_auroc[1] == 1.0 and sel.image_auroc[0] == 0.0
    tied = select_lam(lambda lam: good, labels, masks, grid=(1e-4, 1e-3, 1e-2))
    assert tied.choice == 1e-4 and len(set(tied.curve)) == 1
    assert tied.to_json()["choice"] == 1e-4
    # AUPRO does not choose: equal image AUROC, the larger lam locating better, the smaller lam still wins
    blurry = good.copy()
    blurry[2, 0, 1] = blurry[3, 1, 0] = 5.1  # outside the masks, above the defects: worse AUPRO
    by_lam = select_lam(lambda lam: blurry if lam == 1e-4 else good, labels, masks, grid=(1e-4, 1e-3))
    assert by_lam.image_auroc == (1.0, 1.0) and by_lam.aupro[0] < by_lam.aupro[1] and by_lam.choice == 1e-4


def test_select_lam_refuses_bad_input():
    labels, masks = np.array([0, 1]), np.zeros((2, 2, 2), dtype=bool)
    with pytest.raises(ValueError, match="positive values"):
        select_lam(lambda lam: np.zeros((2, 2, 2)), labels, masks, grid=(0.0,))
    with pytest.raises(ValueError, match="gave maps of shape"):
        select_lam(lambda lam: np.zeros((2, 3, 3)), labels, masks, grid=(1e-2,))


def test_pseudo_defects_change_the_image_only_near_their_mask():
    rng = np.random.default_rng(0)
    base = np.random.default_rng(1).uniform(0.2, 0.8, (64, 64, 3)).astype(np.float32)
    donors = [np.random.default_rng(2).uniform(0.2, 0.8, (64, 64, 3)).astype(np.float32)]
    images, masks, kinds = make_pseudo_defects(rng, [base] * len(PSEUDO_DEFECTS), donors)
    assert kinds == list(PSEUDO_DEFECTS)
    for img, mask, kind in zip(images, masks, kinds):
        assert img.shape == base.shape and img.dtype == np.float32 and mask.shape == (64, 64)
        assert mask.any(), kind
        changed = np.abs(img - base).max(axis=2) > 1e-6
        near = ndimage.binary_dilation(mask, iterations=4)
        assert not (changed & ~near).any(), f"{kind} changed pixels far from its mask"
    with pytest.raises(ValueError, match="unknown pseudo-defect kind"):
        make_pseudo_defects(rng, [base], donors, kinds=("nope",))


def test_pseudo_defect_strength_multiplies_the_painted_change():
    base = np.random.default_rng(1).uniform(0.3, 0.7, (64, 64, 3)).astype(np.float32)
    donors = [np.random.default_rng(2).uniform(0.3, 0.7, (64, 64, 3)).astype(np.float32)]
    faint, masks, kinds = make_pseudo_defects(np.random.default_rng(4), [base] * len(PSEUDO_DEFECTS), donors)
    strong, masks4, kinds4 = make_pseudo_defects(
        np.random.default_rng(4), [base] * len(PSEUDO_DEFECTS), donors, strength=4.0
    )
    assert kinds4 == kinds and all((a == b).all() for a, b in zip(masks, masks4))  # same draws, same masks
    for f, s in zip(faint, strong):
        expected = np.clip(base + 4.0 * (f - base), 0.0, 1.0)
        np.testing.assert_allclose(s, expected, atol=1e-6)
        assert np.abs(s - base).max() > np.abs(f - base).max()
    for bad in (0.0, -1.0, float("nan"), float("inf"), "4"):
        with pytest.raises(ValueError, match="strength must be a positive finite number"):
            make_pseudo_defects(np.random.default_rng(4), [base], donors, strength=bad)


def test_paired_auroc_difference_matches_sklearn_and_a_bootstrap():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(8)
    labels = np.r_[np.zeros(30), np.ones(25)].astype(int)
    base = rng.normal(size=55) + labels
    a = base + 0.3 * rng.normal(size=55)
    b = base + 0.3 * rng.normal(size=55) + 0.4 * labels
    got = paired_auroc_difference(a, b, labels)
    assert got["auroc_a"] == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert got["auroc_b"] == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    assert got["difference"] == pytest.approx(got["auroc_a"] - got["auroc_b"], abs=1e-15)
    assert got["z"] == pytest.approx(got["difference"] / got["standard_error"])
    # the DeLong standard error against a seeded stratified bootstrap of the same paired difference
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    diffs = []
    for _ in range(2000):
        idx = np.r_[rng.choice(neg, neg.size), rng.choice(pos, pos.size)]
        diffs.append(roc_auc_score(labels[idx], a[idx]) - roc_auc_score(labels[idx], b[idx]))
    assert got["standard_error"] == pytest.approx(np.std(diffs), rel=0.15)
    # the same scoring twice: no difference, no error; a strictly better one with no spread: +inf
    same = paired_auroc_difference(a, a, labels)
    assert same["difference"] == 0 and same["standard_error"] == 0 and same["z"] == 0
    perfect = paired_auroc_difference(labels + 0.0, -(labels + 0.0), labels)
    assert perfect["difference"] == 1.0 and perfect["z"] == np.inf


def test_paired_auroc_difference_refuses_bad_input():
    with pytest.raises(ValueError, match="one per image"):
        paired_auroc_difference(np.zeros(3), np.zeros(4), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="both classes"):
        paired_auroc_difference(np.zeros(3), np.zeros(3), np.ones(3))
