"""Tiling: score large or non-square images as overlapping square tiles and stitch the maps back.

    from crd_fast import CRDDetector
    from crd_fast.detector.tiling import TiledDetector
    det = CRDDetector(backbone="resnet18", resize=256, crop=256)
    tiled = TiledDetector(det, tile=256, overlap=64).fit(large_good_images)
    result = tiled.predict(large_images)   # anomaly_maps (N, H, W) at the images' own resolution

A defect of a few pixels in a 4000 x 3000 picture vanishes when the whole picture is resized to the
model's 256 px input; tiles keep the native resolution. Each tile is scored whole (the detector must use
``resize == crop``, so nothing is cut away), tile maps are resized back to the tile's size and stitched
by the maximum where tiles overlap, and an image's score is its highest tile score.

``size=(H, W)`` first resizes every image to H x W (any aspect ratio, no square crop), e.g. to bring very
large pictures to a working resolution before tiling.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ..data.images import Images, iter_images
from ..features.preprocess import load_image, to_unit_tensor
from ..metrics.pixels import pixel_quantile_threshold
from ..metrics.thresholds import quantile_threshold
from ..postprocess.results import DetectionResult
from .detector import CRDDetector

logger = logging.getLogger(__name__)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels with ``stride`` covering [0, length); the last is flush with
    the end (so it may overlap its neighbour more)."""
    if length < tile:
        raise ValueError(
            f"an image side of {length} px is smaller than the tile ({tile} px); "
            "use a smaller tile or the detector directly"
        )
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


class TiledDetector:
    """A fitted-or-not ``CRDDetector`` applied tile by tile.

    Args:
        detector: a ``CRDDetector`` with ``resize == crop`` (its input size; tiles are resized to it).
        tile: tile side in image pixels (after ``size``).
        overlap: pixels shared by neighbouring tiles (default: a quarter tile); ``0 <= overlap < tile``.
        size: optional (H, W) every image is resized to first (bilinear, antialiased; no crop).

    ``predict`` returns a ``DetectionResult`` whose ``anomaly_maps`` are (N, H, W) at the (resized) image
    size and whose ``patch_maps`` hold the grid of tile scores (N, tiles down, tiles across); the images of
    one call must share a size. The detector's image and pixel thresholds apply to the tiled scores
    (calibrate them with ``calibrate`` / ``calibrate_pixels`` here, on tiled images).
    """

    def __init__(
        self, detector: CRDDetector, tile: int, overlap: Optional[int] = None, size: Optional[Sequence[int]] = None
    ) -> None:
        pre = detector.preprocess
        if pre.resize != pre.crop:
            raise ValueError(
                f"tiling needs a detector with resize == crop (each tile is scored whole), got resize="
                f"{pre.resize}, crop={pre.crop}"
            )
        if not isinstance(tile, int) or isinstance(tile, bool) or tile < 8:
            raise ValueError(f"tile must be an integer >= 8, got {tile!r}")
        overlap = tile // 4 if overlap is None else overlap
        if not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise ValueError(f"overlap must be an integer in [0, tile), got {overlap!r}")
        if size is not None:
            size = tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < tile:
                raise ValueError(f"size must be (H, W) with both sides >= tile ({tile}), got {size!r}")
        self.detector = detector
        self.tile, self.overlap, self.size = tile, overlap, size

    # ---- tiles --------------------------------------------------------------------------------------
    def _image(self, image: Any) -> torch.Tensor:
        t = to_unit_tensor(load_image(image) if isinstance(image, str) else image)
        if self.size is not None and tuple(t.shape[-2:]) != self.size:
            t = TF.resize(t, list(self.size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return t

    def grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """(top, left) of every tile of an image of ``height`` x ``width``, row by row."""
        stride = self.tile - self.overlap
        return [(y, x) for y in tile_starts(height, self.tile, stride) for x in tile_starts(width, self.tile, stride)]

    def tiles(self, image: torch.Tensor) -> torch.Tensor:
        """The (T, 3, crop, crop) tiles of a (3, H, W) [0, 1] image, resized to the detector's input size."""
        t = self.tile
        tiles = torch.stack([image[:, y : y + t, x : x + t] for y, x in self.grid(*image.shape[-2:])])
        crop = self.detector.preprocess.crop
        if t != crop:
            tiles = F.interpolate(tiles, size=(crop, crop), mode="bilinear", align_corners=False, antialias=True)
        return tiles.clamp(0, 1)

    def _iter(self, images: Images) -> Iterator[tuple[Optional[str], torch.Tensor]]:
        for path, image in iter_images(images):
            yield path, self._image(image)

    # ---- fit ------------------------------------------------------------------------------------------
    def fit(self, images: Images, progress: bool = False) -> "TiledDetector":
        """Fit the detector on every tile of the defect-free ``images`` (discarding any earlier fit).

        With lam_rel or spatial "auto", all tiles go through one ``fit`` so that the label-free choice sees
        them all (counted as images: the hold-out takes every 8th tile).
        """
        options = self.detector.options
        if options.lam_rel == "auto" or options.spatial == "auto":
            counter = [0]

            def all_tiles() -> Iterator[torch.Tensor]:
                for _, image in self._iter(images):
                    counter[0] += 1
                    yield from self.tiles(image)

            self.detector.fit(all_tiles(), progress=progress)
            logger.info("fitted on %d tiles of %d images (tile %d px)", self.detector.n_images, counter[0], self.tile)
            return self
        first = True
        n = 0
        for _, image in self._iter(images):
            tiles = self.tiles(image)
            if first:
                self.detector.fit(tiles, progress=progress)
                first = False
            else:
                self.detector.partial_fit(tiles, progress=progress)
            n += 1
        if first:
            raise ValueError("no images to fit on")
        logger.info(
            "fitted on %d tiles of %d images (tile %d px, overlap %d px)",
            self.detector.n_images,
            n,
            self.tile,
            self.overlap,
        )
        return self

    # ---- predict --------------------------------------------------------------------------------------
    def predict_one(self, image: torch.Tensor) -> tuple[float, np.ndarray, np.ndarray]:
        """(image score, stitched (H, W) anomaly map, (rows, cols) tile scores) of one (3, H, W) image."""
        height, width = image.shape[-2:]
        grid = self.grid(height, width)
        result = self.detector.predict(self.tiles(image), progress=False)
        maps = torch.from_numpy(result.anomaly_maps)[:, None]
        if maps.shape[-1] != self.tile:
            maps = F.interpolate(maps, size=(self.tile, self.tile), mode="bilinear", align_corners=False)
        stitched = torch.full((height, width), -torch.inf)
        for (y, x), m in zip(grid, maps[:, 0]):
            region = stitched[y : y + self.tile, x : x + self.tile]
            torch.maximum(region, m, out=region)
        rows = len({y for y, _ in grid})
        scores = result.image_scores
        return float(scores.max()), stitched.numpy(), scores.reshape(rows, -1).astype(np.float32)

    def predict(self, images: Images, progress: bool = False) -> DetectionResult:
        """Image scores (highest tile score), stitched anomaly maps and tile-score grids of ``images``."""
        scores, maps, grids, paths = [], [], [], []
        for path, image in self._iter(images):
            if maps and image.shape[-2:] != maps[0].shape[-2:]:
                raise ValueError(
                    f"images of one predict call must share a size (or pass size=(H, W)): got "
                    f"{tuple(maps[0].shape[-2:])} and {tuple(image.shape[-2:])}"
                )
            score, amap, grid = self.predict_one(image)
            scores.append(np.array([score]))
            maps.append(amap[None])
            grids.append(grid[None])
            paths.append(path)
        det = self.detector
        result = DetectionResult.from_batches(scores, maps, grids, paths)
        result.apply_threshold(det.threshold, det.train_score_stats)
        return result.apply_pixel_threshold(det.pixel_threshold)

    def calibrate(self, normal_images: Images, q: float = 0.99) -> float:
        """Image threshold: the ``q`` quantile of held-out defect-free images' tiled scores; returns it."""

        threshold = quantile_threshold(self.predict(normal_images).image_scores, q)
        self.detector.set_threshold(threshold)
        return threshold

    def calibrate_pixels(self, normal_images: Images, q: float = 0.999) -> float:
        """Pixel threshold: the ``q`` quantile of held-out defect-free images' stitched maps; returns it."""

        threshold = pixel_quantile_threshold(self.predict(normal_images).anomaly_maps, q)
        self.detector.set_pixel_threshold(threshold)
        return threshold

    def __repr__(self) -> str:
        return f"TiledDetector(tile={self.tile}, overlap={self.overlap}, size={self.size}, detector={self.detector!r})"
