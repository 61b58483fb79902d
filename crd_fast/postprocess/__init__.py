"""After scoring (torch-free, shared with the ONNX runtime): thresholds, normalisation, result objects."""

from .pixels import pixel_f1, pixel_f1_threshold, pixel_quantile_threshold, predict_masks
from .results import DetectionResult
from .thresholds import check_threshold, f1_threshold, normalize_scores, quantile_threshold

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
