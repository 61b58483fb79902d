"""Pixel-level decisions (torch-free): a threshold on anomaly-map values, predicted masks, pixel F1.

A pixel whose anomaly-map value is at or above the pixel threshold is "defective". Two ways to choose it,
as for images (see ``thresholds``):

- ``pixel_quantile_threshold``: from defect-free images alone, a high quantile of their anomaly-map
  values (q = 0.999: about 0.1 % of normal pixels flagged);
- ``pixel_f1_threshold``: from labelled ground-truth masks, the value with the best pixel F1.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..io.tensors import numpy_if_tensor

#: Pixels looked at by ``pixel_f1_threshold`` at most (an even subsample beyond that): the F1 curve of a few
#: million pixels is as good as that of all of them, and sorting stays cheap.
MAX_F1_PIXELS = 4_000_000


def _maps(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(numpy_if_tensor(x))
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (N, H, W), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numbers, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _masks(masks: Any, maps: np.ndarray) -> np.ndarray:
    m = np.asarray(numpy_if_tensor(masks))
    if m.shape != maps.shape:
        raise ValueError(f"masks {m.shape} and anomaly maps {maps.shape} differ in shape")
    return m != 0


def pixel_quantile_threshold(normal_maps: Any, q: float = 0.999) -> float:
    """The ``q`` quantile of all anomaly-map values of defect-free images (their (N, H, W) maps)."""
    if not (isinstance(q, (int, float)) and 0.0 <= q <= 1.0):
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    return float(np.quantile(_maps(normal_maps, "normal_maps").astype(np.float64).reshape(-1), q))


def pixel_f1_threshold(maps: Any, masks: Any) -> float:
    """The map value t maximising pixel F1 of "value >= t is defective" against ground-truth ``masks``.

    ``maps`` and ``masks`` are (N, H, W) (or (H, W)) at the same resolution; masks nonzero = defect and
    must contain defect and normal pixels.
    """
    from sklearn.metrics import precision_recall_curve

    a = _maps(maps, "maps")
    m = _masks(masks, a)
    if m.all() or not m.any():
        raise ValueError("masks must contain both defect and normal pixels to choose an F1 pixel threshold")
    values, truth = a.reshape(-1), m.reshape(-1)
    step = -(-values.size // MAX_F1_PIXELS)
    if step > 1:
        values, truth = values[::step], truth[::step]
    precision, recall, thresholds = precision_recall_curve(truth, values.astype(np.float64))
    p, r = precision[:-1], recall[:-1]  # the last pair has no threshold
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    return float(thresholds[int(np.argmax(f1))])


def check_pixel_threshold(value: Any) -> Optional[float]:
    """A pixel threshold as float, or None; NaN, Inf or a non-number is a ValueError."""
    if value is not None and not (isinstance(value, (int, float, np.floating)) and math.isfinite(value)):
        raise ValueError(f"pixel_threshold must be a finite number or None, got {value!r}")
    return None if value is None else float(value)


def predict_masks(maps: Any, threshold: float) -> np.ndarray:
    """Boolean masks ``maps >= threshold`` (same shape as ``maps``)."""
    return _maps(maps, "maps") >= float(threshold)


def pixel_f1(pred_masks: Any, masks: Any) -> float:
    """F1 of predicted against ground-truth masks over all pixels (1.0 when both are empty everywhere)."""
    pred = np.asarray(pred_masks) != 0
    truth = _masks(masks, pred)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    if tp + fp + fn == 0:
        return 1.0
    return 2.0 * tp / (2.0 * tp + fp + fn)
