"""DetectionResult: what a detector returns for N images (torch-free, shared by CRDDetector and the ONNX runtime)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from .thresholds import normalize_scores


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
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    patch_maps: np.ndarray
    paths: list[Optional[str]]
    normalized_scores: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    threshold: Optional[float] = None

    @classmethod
    def from_batches(cls, scores: list, anomaly_maps: list, patch_maps: list, paths: list) -> "DetectionResult":
        """Concatenate per-batch numpy outputs; refuses an empty prediction (no images were given)."""
        if not scores:
            raise ValueError("no images to predict")
        return cls(np.concatenate(scores), np.concatenate(anomaly_maps), np.concatenate(patch_maps), list(paths))

    def __len__(self) -> int:
        return int(self.image_scores.shape[0])

    def apply_threshold(self, threshold: Optional[float], train_score_stats: Optional[Mapping[str, Any]]) -> "DetectionResult":
        """Fill ``labels``, ``normalized_scores`` and ``threshold`` for ``threshold`` (no-op when None); returns self."""
        if threshold is not None:
            self.threshold = float(threshold)
            self.labels = self.image_scores >= self.threshold
            self.normalized_scores = normalize_scores(self.image_scores, self.threshold, train_score_stats)
        return self
