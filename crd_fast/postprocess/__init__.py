"""After scoring (torch-free, shared with the ONNX runtime): thresholds, normalisation, result objects."""

from .results import DetectionResult
from .thresholds import check_threshold, f1_threshold, normalize_scores, quantile_threshold

__all__ = ["DetectionResult", "check_threshold", "f1_threshold", "normalize_scores", "quantile_threshold"]
