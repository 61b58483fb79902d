"""Tiling: large and non-square images scored tile by tile, maps stitched at the image's own resolution."""

from __future__ import annotations

import numpy as np
import pytest

from crd_fast import CRDDetector
from crd_fast.detector.tiling import TiledDetector, tile_starts

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TILE = 64


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A periodic texture with a random phase and a little noise, uint8 (height, width, 3)."""
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    base = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 9 + p1) + 0.2 * np.sin(2 * np.pi * yy / 9 + p2)
    img = np.stack([base, 0.9 * base, 0.8 * base], -1) + rng.normal(0, 0.03, (height, width, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def detector() -> CRDDetector:
    return CRDDetector(backbone="resnet18", weights="random", resize=TILE, crop=TILE, batch_size=8, blur_sigma=2.0)


def test_tile_starts_cover_the_image():
    assert tile_starts(64, 64, 48) == [0]
    assert tile_starts(200, 64, 48) == [0, 48, 96, 136]
    for length in range(64, 300, 7):
        starts = tile_starts(length, 64, 48)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + 64] = True
        assert covered.all() and starts[-1] + 64 == length
    with pytest.raises(ValueError, match="smaller than the tile"):
        tile_starts(50, 64, 48)


def test_bad_options():
    with pytest.raises(ValueError, match="resize == crop"):
        TiledDetector(CRDDetector(backbone="resnet18", weights="random", resize=80, crop=64), tile=64)
    det = detector()
    with pytest.raises(ValueError, match="overlap"):
        TiledDetector(det, tile=64, overlap=64)
    with pytest.raises(ValueError, match="size must be"):
        TiledDetector(det, tile=64, size=(32, 100))


def test_one_tile_equals_the_plain_detector():
    rng = np.random.default_rng(1)
    det = detector().fit([texture(rng, TILE, TILE) for _ in range(6)], progress=False)
    img = texture(rng, TILE, TILE)
    plain = det.predict([img], progress=False)
    tiled = TiledDetector(det, tile=TILE).predict([img])
    np.testing.assert_allclose(tiled.anomaly_maps, plain.anomaly_maps, rtol=1e-6, atol=1e-6)
    assert tiled.image_scores[0] == pytest.approx(plain.image_scores[0], rel=1e-6)


def test_small_defect_in_a_large_non_square_image_is_found():
    rng = np.random.default_rng(0)
    height, width = 192, 320  # non-square: 4 x 7 tiles of 64 px, 16 px overlap (more where the last is flush)
    tiled = TiledDetector(detector(), tile=TILE, overlap=16)
    tiled.fit([texture(rng, height, width) for _ in range(4)])
    good = [texture(rng, height, width) for _ in range(3)]
    bad = texture(rng, height, width)
    y, x = 131, 237  # a 10 x 10 px defect: 0.16 % of the image
    bad[y : y + 10, x : x + 10] = (15, 80, 15)
    result = tiled.predict(good + [bad])
    assert result.anomaly_maps.shape == (4, height, width)
    assert result.patch_maps.shape == (4, 4, 7)  # tile starts 0, 48, 96, 128 down; 0, 48, ..., 240, 256 across
    assert result.image_scores[3] > result.image_scores[:3].max()
    peak = np.unravel_index(np.argmax(result.anomaly_maps[3]), (height, width))
    assert abs(peak[0] - (y + 5)) <= 12 and abs(peak[1] - (x + 5)) <= 12, peak

    # pixel threshold from good tiled images: the defect is in the predicted mask
    tiled.calibrate_pixels(good, q=0.9999)
    masks = tiled.predict([bad]).pred_masks
    assert masks[0, y : y + 10, x : x + 10].any()


def test_images_of_one_call_must_share_a_size():
    rng = np.random.default_rng(2)
    tiled = TiledDetector(detector(), tile=TILE).fit([texture(rng, 100, 100)])
    with pytest.raises(ValueError, match="share a size"):
        tiled.predict([texture(rng, 100, 100), texture(rng, 100, 120)])
    resized = TiledDetector(tiled.detector, tile=TILE, size=(96, 160))
    assert resized.predict([texture(rng, 100, 100), texture(rng, 100, 120)]).anomaly_maps.shape == (2, 96, 160)
