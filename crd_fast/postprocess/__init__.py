"""After scoring (torch-free, shared with the ONNX runtime): the result object (thresholds and normalisation are
crd_fast.metrics'; re-exported here, where users look for them)."""

from ..metrics.pixels import pixel_f1, pixel_f1_threshold, pixel_quantile_threshold, predict_masks
from ..metrics.thresholds import check_threshold, f1_threshold, normalize_scores, quantile_threshold
from .results import DetectionResult

__all__ = [
    "DetectionResult",
    "pixel_f1",
    "pixel_f1_threshold",
    "pixel_quantile_threshold",
    "predict_masks",
    "check_threshold",
    "f1_threshold",
    "normalize_scores",
    "quantile_threshold",
]
