"""DetectionResult: what a detector returns for N images (torch-free, shared by CRDDetector and the ONNX runtime)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from ..metrics.pixels import predict_masks
from ..metrics.thresholds import normalize_scores


@dataclass
class DetectionResult:
    """Predictions for N images.

    image_scores: (N,) float64, the largest patch score of each image.
    anomaly_maps: (N, H, W) float32 at the model input (crop) resolution, aligned with
        ``Preprocess.display(image)``.
    patch_maps: (N, h, w) float32 patch scores on the feature grid.
    paths: the image file of each row, None for in-memory images.
    normalized_scores: (N,) in [0, 1], 0.5 at the threshold (see ``thresholds.normalize_scores``);
        None without a threshold.
    labels: (N,) bool, image_scores >= threshold; None without a threshold.
    threshold: the threshold used, or None.
    pred_masks: (N, H, W) bool, anomaly_maps >= pixel_threshold (aligned with ``anomaly_maps``); None without
        a pixel threshold.
    pixel_threshold: the pixel (anomaly-map value) threshold used, or None.
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    patch_maps: np.ndarray
    paths: list[Optional[str]]
    normalized_scores: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    threshold: Optional[float] = None
    pred_masks: Optional[np.ndarray] = None
    pixel_threshold: Optional[float] = None

    @classmethod
    def from_batches(cls, scores: list, anomaly_maps: list, patch_maps: list, paths: list) -> "DetectionResult":
        """Concatenate per-batch numpy outputs; refuses an empty prediction (no images were given)."""
        if not scores:
            raise ValueError("no images to predict")
        return cls(np.concatenate(scores), np.concatenate(anomaly_maps), np.concatenate(patch_maps), list(paths))

    def __len__(self) -> int:
        return int(self.image_scores.shape[0])

    def apply_threshold(
        self, threshold: Optional[float], train_score_stats: Optional[Mapping[str, Any]]
    ) -> "DetectionResult":
        """Fill ``labels``, ``normalized_scores`` and ``threshold`` (no-op when None); returns self."""
        if threshold is not None:
            self.threshold = float(threshold)
            self.labels = self.image_scores >= self.threshold
            self.normalized_scores = normalize_scores(self.image_scores, self.threshold, train_score_stats)
        return self

    def apply_pixel_threshold(self, pixel_threshold: Optional[float]) -> "DetectionResult":
        """Fill ``pred_masks`` and ``pixel_threshold`` (no-op when None); returns self."""
        if pixel_threshold is not None:
            self.pixel_threshold = float(pixel_threshold)
            self.pred_masks = predict_masks(self.anomaly_maps, self.pixel_threshold)
        return self
