"""Metrics and thresholds (torch-free, the bottom layer every other package may use).

* ``scores``: image AUROC, pixel AUROC, AUPRO, F1-max (numpy, scipy and scikit-learn);
* ``thresholds``: image-score thresholds (a quantile of normal scores, or F1-optimal) and score normalisation;
* ``pixels``: pixel thresholds, predicted masks and pixel F1.
"""

from .pixels import check_pixel_threshold, pixel_f1, pixel_f1_threshold, pixel_quantile_threshold, predict_masks
from .scores import aupro, f1_max, image_auroc, pixel_auroc
from .thresholds import check_threshold, f1_threshold, normalize_scores, quantile_threshold

__all__ = [
    "aupro",
    "check_pixel_threshold",
    "check_threshold",
    "f1_max",
    "f1_threshold",
    "image_auroc",
    "normalize_scores",
    "pixel_auroc",
    "pixel_f1",
    "pixel_f1_threshold",
    "pixel_quantile_threshold",
    "predict_masks",
    "quantile_threshold",
]
