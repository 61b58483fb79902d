"""Defect-like pseudo-defects (crd_fast/synthetic/pseudo.py DEFECT_LIKE): drawn lines against a float64 reference,
changes proportional to their opacity and confined by their masks, sizes relative to the image, strength."""

import numpy as np
import pytest

from crd_fast.synthetic.pseudo import (
    ALL_PSEUDO_DEFECTS,
    DEFECT_LIKE,
    PSEUDO_DEFECTS,
    make_pseudo_defects,
    polyline_alpha,
)


def _segment_distance(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Float64 reference: every pixel's distance to the polyline's segments."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    best = np.full(shape, np.inf)
    for a, b in zip(points[:-1], points[1:]):
        d = b - a
        t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / max(float(d @ d), 1e-300), 0.0, 1.0)
        best = np.minimum(best, np.hypot(yy - (a[0] + t * d[0]), xx - (a[1] + t * d[1])))
    return best


@pytest.mark.parametrize("width", [1.0, 2.5, 4.0])
def test_polyline_alpha_follows_the_distance_to_the_line(width):
    rng = np.random.default_rng(int(width * 10))
    points = np.cumsum(rng.uniform(-6, 9, (6, 2)), axis=0) + np.array([8.0, 5.0])
    shape = (48, 40)
    alpha = polyline_alpha(points, shape, width)
    assert alpha.dtype == np.float32 and alpha.shape == shape
    # the line is rasterised to pixel centres (at most half a diagonal from the exact segment) before the
    # distance transform, so the opacity is the reference's to within that rounding
    exact = np.clip(width / 2 + 0.5 - _segment_distance(points, shape), 0.0, 1.0)
    assert np.abs(alpha - exact).max() <= 0.5 * np.sqrt(2) + 1e-6
    assert (alpha[exact >= 1.0 - 1e-12] >= 1.0 - 0.5 * np.sqrt(2) - 1e-6).all()
    assert not alpha[_segment_distance(points, shape) > width / 2 + 0.5 + 0.5 * np.sqrt(2)].any()


def test_polyline_alpha_of_a_line_outside_the_image_is_zero():
    assert not polyline_alpha(np.array([[-20.0, -20.0], [-10.0, -5.0]]), (16, 16), 3.0).any()


@pytest.mark.parametrize("kind", list(DEFECT_LIKE))
def test_defect_like_change_is_proportional_to_opacity_and_masked(kind):
    # a flat image and a flat donor: every kind's change is then its opacity times a constant, so the mask
    # (opacity >= half its peak) is where the change is at least half the largest change
    base = np.full((96, 96, 3), 0.5, dtype=np.float32)
    donor = np.full((96, 96, 3), 0.8, dtype=np.float32)
    for seed in range(6):
        image, mask = DEFECT_LIKE[kind](np.random.default_rng(seed), base, [donor])
        assert image.shape == base.shape and image.dtype == np.float32 and mask.shape == (96, 96)
        assert mask.any(), kind
        change = np.abs(image.astype(np.float64) - base).max(axis=2)
        peak = change.max()
        assert peak > 0.05, f"{kind} barely changed the image"
        np.testing.assert_allclose(image[..., 0], image[..., 1], atol=1e-7)  # grey in, grey out
        assert (change[mask] >= 0.45 * peak).all()
        assert not (mask == False)[change >= 0.55 * peak].any()  # noqa: E712


@pytest.mark.parametrize("kind", list(DEFECT_LIKE))
def test_defect_like_sizes_scale_with_the_image(kind):
    fractions = {}
    for side in (80, 240):
        base = np.random.default_rng(1).uniform(0.3, 0.7, (side, side, 3)).astype(np.float32)
        donor = np.random.default_rng(2).uniform(0.3, 0.7, (side, side, 3)).astype(np.float32)
        areas = [DEFECT_LIKE[kind](np.random.default_rng(s), base, [donor])[1].mean() for s in range(8)]
        fractions[side] = float(np.mean(areas))
    assert 0.5 < fractions[80] / fractions[240] < 2.0, fractions


def test_make_pseudo_defects_paints_defect_like_kinds_by_name_with_strength():
    base = np.random.default_rng(1).uniform(0.3, 0.7, (64, 64, 3)).astype(np.float32)
    donors = [np.random.default_rng(2).uniform(0.3, 0.7, (64, 64, 3)).astype(np.float32)]
    kinds = tuple(DEFECT_LIKE)
    one, masks, names = make_pseudo_defects(np.random.default_rng(3), [base] * 5, donors, kinds=kinds)
    two, masks2, names2 = make_pseudo_defects(np.random.default_rng(3), [base] * 5, donors, kinds=kinds, strength=2)
    assert names == names2 == list(kinds)
    for a, b, m, m2 in zip(one, two, masks, masks2):
        np.testing.assert_array_equal(m, m2)
        np.testing.assert_allclose(b, np.clip(base + 2.0 * (a.astype(np.float64) - base), 0, 1), atol=1e-6)
    # the detector's default kinds are unchanged: the defect-like ones are only painted when named
    assert set(PSEUDO_DEFECTS).isdisjoint(DEFECT_LIKE)
    assert ALL_PSEUDO_DEFECTS == {**PSEUDO_DEFECTS, **DEFECT_LIKE}
    _, _, default = make_pseudo_defects(np.random.default_rng(3), [base] * len(PSEUDO_DEFECTS), donors)
    assert default == list(PSEUDO_DEFECTS)
