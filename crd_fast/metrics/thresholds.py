"""Decision thresholds on image scores, and score normalisation around a threshold.

A score at or above the threshold means "defective". Two ways to choose it:

- ``quantile_threshold``: from defect-free data alone, a high quantile of held-out normal scores
  (q = 0.99: about 1 % of normal images flagged);
- ``f1_threshold``: from labelled validation data, the threshold with the best F1 score.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from ..io.tensors import numpy_if_tensor
from .scores import f1_max


def _scores(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(numpy_if_tensor(x), dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def quantile_threshold(normal_scores: Any, q: float = 0.99) -> float:
    """The ``q`` quantile (linear interpolation) of scores of defect-free images."""
    if not (isinstance(q, (int, float)) and 0.0 <= q <= 1.0):
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    return float(np.quantile(_scores(normal_scores, "normal_scores"), q))


def f1_threshold(scores: Any, labels: Any) -> float:
    """The threshold t maximising F1 of the rule "score >= t is defective" (labels: 1/True = defective).

    The threshold of :func:`crd_fast.metrics.scores.f1_max`, which checks the inputs.
    """
    # Imported here: scipy and scikit-learn load only when a labelled threshold is chosen.

    return f1_max(labels, scores)[1]


def normalize_scores(scores: Any, threshold: float, stats: Optional[Mapping[str, float]] = None) -> np.ndarray:
    """Map scores to [0, 1] with the threshold at 0.5: clip((s - t) / span + 0.5, 0, 1).

    ``span`` is the spread of the training image scores (max - min from ``stats``), or |t| when no
    statistics are available; it sets how fast scores saturate, not the decision (labels use s >= t).
    """
    s = np.asarray(scores, dtype=np.float64)
    span = 0.0
    if stats:
        span = float(stats.get("max", 0.0)) - float(stats.get("min", 0.0))
    if not (math.isfinite(span) and span > 0):
        span = abs(float(threshold)) or 1.0
    return np.clip((s - float(threshold)) / span + 0.5, 0.0, 1.0)


def check_threshold(value: Any) -> Optional[float]:
    """A threshold as float, or None; anything else (NaN, Inf, not a number) is a ValueError."""
    if value is not None and not (isinstance(value, (int, float, np.floating)) and math.isfinite(value)):
        raise ValueError(f"threshold must be a finite number or None, got {value!r}")
    return None if value is None else float(value)
