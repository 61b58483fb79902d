"""The training score statistics: a fixed-size random sample of training inputs, rescored by the fitted model.

The detector keeps a seeded reservoir sample (crd_fast/detector/reservoir.py) of up to ``SCORE_SAMPLE`` normalised
training inputs; their image scores under the fitted model give the statistics that normalise scores
(``DetectionResult.normalized_scores``) and that exports record.
"""

from __future__ import annotations

import numpy as np

#: Training inputs kept (reservoir sample, fixed size) to compute the training score statistics.
SCORE_SAMPLE = 32


def score_statistics(scores: np.ndarray) -> dict[str, float]:
    """The training score statistics of image ``scores`` (n, mean, std, min, max, q50, q90, q95, q99)."""
    scores = np.asarray(scores, dtype=np.float64)
    q = np.quantile(scores, [0.5, 0.9, 0.95, 0.99])
    return {
        "n": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
        "q50": float(q[0]),
        "q90": float(q[1]),
        "q95": float(q[2]),
        "q99": float(q[3]),
    }


__all__ = ["SCORE_SAMPLE", "score_statistics"]
