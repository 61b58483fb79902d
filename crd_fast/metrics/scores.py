"""Evaluation metrics for anomaly detection: image AUROC, pixel AUROC, AUPRO and F1-max.

Conventions (those of MVTec AD and anomalib):
- a higher score means "more anomalous"; a sample is called defective when ``score >= threshold``;
- masks are ground-truth defect masks, any non-zero pixel is a defect pixel (0/1, 0/255 and bool all work);
- AUPRO follows the MVTec AD definition: every connected component of a ground-truth mask is one region
  (8-connectivity, per image); at each threshold the per-region overlap (PRO) is the mean over all regions
  of the fraction of the region's pixels called defective, and the false-positive rate is taken over all
  defect-free pixels of all images. The PRO curve is integrated over FPR in [0, fpr_limit], the end point
  interpolated linearly at exactly ``fpr_limit``, and divided by ``fpr_limit`` so a perfect map scores 1.

Every threshold (every distinct score value) is evaluated, exactly, with one sort of all pixels and
cumulative sums: no loop over thresholds or images.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve, roc_curve

from ..io.tensors import numpy_if_tensor

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "pro_curve",
    "f1_max",
    "roc_points",
    "pixel_roc_points",
    "evaluate",
]

ArrayInput = Union[np.ndarray, Sequence[Any], Any]


def _to_numpy(x: ArrayInput, name: str) -> np.ndarray:
    """Turn a numpy array, torch tensor or (nested) sequence of arrays into a numpy array."""
    x = numpy_if_tensor(x)
    if isinstance(x, (list, tuple)):
        parts = [_to_numpy(p, f"{name}[{i}]") for i, p in enumerate(x)]
        shapes = {p.shape for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"{name}: all items must have the same shape, got {sorted(shapes)}")
        return np.stack(parts) if parts else np.zeros((0,))
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be numeric, got an object array")
    return arr


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    if scores.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be numeric, got dtype {scores.dtype}")
    if scores.dtype.kind != "f" or scores.dtype.itemsize < 4:
        scores = scores.astype(np.float64)  # float32/float64 stay as they are (sorting float32 is faster)
    if not np.isfinite(scores).all():
        n_nan, n_inf = int(np.isnan(scores).sum()), int(np.isinf(scores).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")
    return scores


def _labels_scores(labels: ArrayInput, scores: ArrayInput) -> tuple[np.ndarray, np.ndarray]:
    """Check a (N,) label vector (0/1 or bool, both classes present) and a matching (N,) score vector."""
    y = _to_numpy(labels, "labels")
    s = _to_numpy(scores, "scores")
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} labels, {s.shape[0]} scores")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise ValueError("labels contain NaN or Inf")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"labels must be 0 (normal) or 1 (defective) (0/1 or bool), got values {sorted(values)[:10]}")
    y = y.astype(bool)
    if not y.any():
        raise ValueError("labels contain no defective (1) samples; the metric needs both classes")
    if y.all():
        raise ValueError("labels contain no normal (0) samples; the metric needs both classes")
    return y, _check_scores(s, "scores")


def _masks_maps(masks: ArrayInput, maps: ArrayInput) -> tuple[np.ndarray, np.ndarray]:
    """Check (N, H, W) masks (non-zero = defect) against (N, H, W) anomaly maps of the same shape."""
    m = _to_numpy(masks, "masks")
    a = _to_numpy(maps, "anomaly maps")
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(f"masks and anomaly maps must be (N, H, W) arrays, got shapes {m.shape} and {a.shape}")
    if m.shape != a.shape:
        raise ValueError(
            f"masks and anomaly maps differ in shape: {m.shape} vs {a.shape} "
            "(resize/crop the masks to the anomaly map resolution first)"
        )
    if m.size == 0:
        raise ValueError("masks and anomaly maps are empty")
    if m.dtype.kind not in "biuf":
        raise TypeError(f"masks must be numeric or bool, got dtype {m.dtype}")
    if m.dtype.kind == "f" and not np.isfinite(m).all():
        raise ValueError("masks contain NaN or Inf")
    m = m != 0
    if not m.any():
        raise ValueError("masks contain no defect pixels; pixel metrics need at least one defective image with a mask")
    if m.all():
        raise ValueError("masks contain no defect-free pixels; pixel metrics need normal pixels too")
    return m, _check_scores(a, "anomaly maps")


def image_auroc(labels: ArrayInput, scores: ArrayInput) -> float:
    """Area under the ROC curve of image scores against image labels (1 = defective)."""
    y, s = _labels_scores(labels, scores)
    fpr, tpr, _ = roc_curve(y, s)
    return float(auc(fpr, tpr))  # what sklearn's roc_auc_score computes; shared with roc_points


def pixel_auroc(masks: ArrayInput, maps: ArrayInput) -> float:
    """Area under the ROC curve of every pixel of ``maps`` (N, H, W) against ``masks`` (N, H, W)."""
    m, a = _masks_maps(masks, maps)
    fpr, tpr, _ = roc_curve(m.ravel(), a.ravel())
    return float(auc(fpr, tpr))


def _thin(n: int, max_points: Optional[int]) -> np.ndarray:
    """Indices keeping the first, the last and evenly spaced points between, at most ``max_points``."""
    if max_points is None or n <= max_points:
        return np.arange(n)
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(int))


def _curve_dict(
    x_name: str, x: np.ndarray, y_name: str, y: np.ndarray, thr: np.ndarray, max_points: Optional[int]
) -> dict[str, list]:
    keep = _thin(len(x), max_points)
    # The first threshold is +inf (nothing called defective); JSON has no inf, so it becomes None.
    thresholds = [float(t) if np.isfinite(t) else None for t in thr[keep]]
    return {x_name: x[keep].tolist(), y_name: y[keep].tolist(), "thresholds": thresholds}


def roc_points(labels: ArrayInput, scores: ArrayInput, max_points: Optional[int] = None) -> dict[str, Any]:
    """ROC curve as plain lists ``{"fpr", "tpr", "thresholds", "auc"}``, optionally thinned to ``max_points``.

    Thinning keeps the first and last point and evenly spaced ones between (for plots and JSON reports
    of pixel-level curves with millions of points); ``auc`` is always computed from the full curve and
    equals :func:`image_auroc`.
    """
    y, s = _labels_scores(labels, scores)
    fpr, tpr, thr = roc_curve(y, s)
    out = _curve_dict("fpr", fpr, "tpr", tpr, thr, max_points)
    out["auc"] = float(auc(fpr, tpr))
    return out


def pixel_roc_points(masks: ArrayInput, maps: ArrayInput, max_points: Optional[int] = 512) -> dict[str, Any]:
    """Pixel-level ROC curve like :func:`roc_points`; ``auc`` equals :func:`pixel_auroc`."""
    m, a = _masks_maps(masks, maps)
    fpr, tpr, thr = roc_curve(m.ravel(), a.ravel())
    out = _curve_dict("fpr", fpr, "tpr", tpr, thr, max_points)
    out["auc"] = float(auc(fpr, tpr))
    return out


_EIGHT_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED[1] = True  # 8-connectivity inside each image, nothing across images
_FOUR_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_FOUR_CONNECTED[1] = ndimage.generate_binary_structure(2, 1)


def pro_curve(masks: ArrayInput, maps: ArrayInput, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full PRO curve: ``(fpr, pro, thresholds)``, one point per distinct score, FPR ascending.

    A point at index k says: calling every pixel with ``score >= thresholds[k]`` defective gives false
    positive rate ``fpr[k]`` over the defect-free pixels and mean per-region overlap ``pro[k]``. The curve
    starts at (0, 0) with threshold +inf.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    m, a = _masks_maps(masks, maps)
    regions, n_regions = ndimage.label(m, structure=_EIGHT_CONNECTED if connectivity == 8 else _FOUR_CONNECTED)
    regions = regions.ravel()
    sizes = np.bincount(regions, minlength=n_regions + 1)
    n_normal = float(sizes[0])
    flat = a.ravel()
    order = np.argsort(flat)[::-1]  # descending; the order inside ties does not matter (see below)
    scores = flat[order]
    region_sorted = regions[order]
    # Defect pixels are few: work on their positions in the sorted order instead of on every pixel.
    anom_pos = np.flatnonzero(region_sorted)
    # Once called defective, a pixel of region r adds 1/(n_regions * |r|) to the mean overlap.
    anom_gain = 1.0 / (n_regions * sizes[region_sorted[anom_pos]].astype(np.float64))
    pro_cum = np.r_[0.0, np.cumsum(anom_gain)]
    # With ties, only the last pixel of each group of equal scores is a reachable operating point.
    ends = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1]
    n_anom = np.searchsorted(anom_pos, ends, side="right")  # defect pixels at or above each threshold
    fpr = np.r_[0.0, (ends + 1 - n_anom) / n_normal]
    pro = np.r_[0.0, pro_cum[n_anom]]
    thresholds = np.r_[np.inf, scores[ends].astype(np.float64)]
    pro[-1] = 1.0  # rounding in the running sum can leave it a hair off 1
    return fpr, np.minimum(pro, 1.0), thresholds


def _integrate_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x ascending) from x[0] to ``x_max``, interpolating the end point."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:inside], y[:inside]
    if xs[-1] < x_max and inside < len(x):
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_end]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(masks: ArrayInput, maps: ArrayInput, fpr_limit: float = 0.3, connectivity: int = 8) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AUPRO; 1 is perfect)."""
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro, _ = pro_curve(masks, maps, connectivity=connectivity)
    return _integrate_to(fpr, pro, float(fpr_limit)) / float(fpr_limit)


def f1_max(labels: ArrayInput, scores: ArrayInput) -> tuple[float, float]:
    """The best F1 score over all thresholds and the threshold reaching it (defective if ``score >= t``)."""
    y, s = _labels_scores(labels, scores)
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def evaluate(
    labels: ArrayInput,
    scores: ArrayInput,
    masks: Optional[ArrayInput] = None,
    maps: Optional[ArrayInput] = None,
    fpr_limit: float = 0.3,
    curves: bool = False,
    max_points: Optional[int] = 512,
) -> dict[str, Any]:
    """All metrics of one category as a dict; pixel metrics are None when masks or maps are missing.

    Keys: image_auroc, f1_max, f1_threshold, pixel_auroc, aupro. With ``curves=True`` also
    ``curves = {"image_roc", "pixel_roc", "pro"}`` (thinned to ``max_points``; pixel curves None without
    masks), computed from the same sorted data as the numbers, so each curve's area is the metric.
    """
    f1, thr = f1_max(labels, scores)
    image_roc = roc_points(labels, scores)
    out: dict[str, Any] = {
        "image_auroc": image_roc["auc"],
        "f1_max": f1,
        "f1_threshold": thr,
        "pixel_auroc": None,
        "aupro": None,
    }
    pixel_roc = pro = None
    if masks is not None and maps is not None:
        pixel_roc = pixel_roc_points(masks, maps, max_points=max_points)
        out["pixel_auroc"] = pixel_roc["auc"]
        fpr, pro_values, pro_thr = pro_curve(masks, maps)
        if not 0.0 < float(fpr_limit) <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        out["aupro"] = _integrate_to(fpr, pro_values, float(fpr_limit)) / float(fpr_limit)
        pro = _curve_dict("fpr", fpr, "pro", pro_values, pro_thr, max_points)
        pro["fpr_limit"] = float(fpr_limit)
    if curves:
        out["curves"] = {"image_roc": image_roc, "pixel_roc": pixel_roc, "pro": pro}
    return out
