"""The detector's decision thresholds: set them, or calibrate them on held-out or labelled images.

An image whose score is at or above the image threshold is defective; a pixel whose anomaly-map value is at or
above the pixel threshold is a defect pixel (``DetectionResult.labels`` / ``pred_masks``). The rules themselves
(quantiles of normal data, F1-optimal on labels) are crd_fast/metrics'; this mixin runs the detector's own
``predict`` to feed them.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from ..data.images import Images
from ..metrics.pixels import pixel_f1_threshold, pixel_quantile_threshold
from ..metrics.thresholds import check_threshold, f1_threshold, quantile_threshold
from ..postprocess.results import DetectionResult

logger = logging.getLogger(__name__)


class ThresholdCalibration:
    """Threshold methods of ``CRDDetector`` (which provides ``predict`` and ``preprocess``)."""

    threshold: Optional[float]
    pixel_threshold: Optional[float]
    preprocess: Any

    def predict(self, images: Images, progress: bool = True) -> DetectionResult:  # provided by the detector
        raise NotImplementedError

    def set_threshold(self, value: Optional[float]) -> None:
        """Set the image-score threshold (score >= threshold is defective); None removes it."""
        self.threshold = check_threshold(value)

    def calibrate(self, normal_images: Images, q: float = 0.99, progress: bool = True) -> float:
        """Set the threshold to the ``q`` quantile of held-out defect-free images' scores; returns it."""
        threshold = quantile_threshold(self.predict(normal_images, progress).image_scores, q)
        self.set_threshold(threshold)
        logger.info("image threshold %.6g (quantile %g of held-out normal image scores)", threshold, q)
        return threshold

    def calibrate_labelled(self, images: Images, labels: Any, progress: bool = True) -> float:
        """Set the F1-optimal threshold on labelled validation images (1 = defective); returns it."""
        threshold = f1_threshold(self.predict(images, progress).image_scores, labels)
        self.set_threshold(threshold)
        logger.info("image threshold %.6g (F1-optimal on labelled images)", threshold)
        return threshold

    def set_pixel_threshold(self, value: Optional[float]) -> None:
        """Set the anomaly-map threshold of ``pred_masks`` (value >= threshold is a defect pixel); None removes it."""
        self.pixel_threshold = check_threshold(value)

    def calibrate_pixels(self, normal_images: Images, q: float = 0.999, progress: bool = True) -> float:
        """Set the pixel threshold to the ``q`` quantile of the anomaly-map values of held-out defect-free
        images; returns it."""
        threshold = pixel_quantile_threshold(self.predict(normal_images, progress).anomaly_maps, q)
        self.set_pixel_threshold(threshold)
        logger.info("pixel threshold %.6g (quantile %g of held-out normal anomaly-map values)", threshold, q)
        return threshold

    def calibrate_pixels_labelled(self, images: Images, masks: Sequence[Any], progress: bool = True) -> float:
        """Set the pixel-F1-optimal pixel threshold on images with ground-truth masks; returns it.

        ``masks``: one per image, as the image was given (PIL image or (H, W) array, nonzero = defect);
        they are resized and cropped like the images (``preprocess.mask``).
        """
        maps = self.predict(images, progress).anomaly_maps
        if len(masks) != maps.shape[0]:
            raise ValueError(f"{len(masks)} masks for {maps.shape[0]} images")
        truth = np.stack([self.preprocess.mask(m) for m in masks])
        threshold = pixel_f1_threshold(maps, truth)
        self.set_pixel_threshold(threshold)
        logger.info("pixel threshold %.6g (pixel-F1-optimal on labelled masks)", threshold)
        return threshold


__all__ = ["ThresholdCalibration"]
