"""The training score statistics: a fixed-size random sample of training inputs, rescored by the fitted model.

The detector keeps a seeded reservoir sample (crd_fast/detector/reservoir.py) of up to ``SCORE_SAMPLE`` normalised
training inputs; their image scores under the fitted model give the statistics that normalise scores
(``DetectionResult.normalized_scores``) and that exports record.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .reservoir import Reservoir

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


class TrainingScores:
    """The sample of training inputs and the statistics of their scores, recomputed on demand after a change."""

    def __init__(self, seed: int) -> None:
        self.reservoir: Reservoir[torch.Tensor] = Reservoir(SCORE_SAMPLE, seed)
        self._stats: Optional[dict[str, float]] = None
        self._stale = False

    def remember(self, x: torch.Tensor) -> None:
        """Offer a batch of normalised inputs; only the inputs the sample keeps are copied to the CPU."""
        self.reservoir.extend_lazily(x.shape[0], lambda kept: {p: x[p].detach().to("cpu", copy=True) for p in kept})
        self._stale = True

    def take(self, reservoir: Reservoir[torch.Tensor]) -> None:
        """Use ``reservoir`` (a fit's sample made elsewhere); the statistics follow on demand."""
        if reservoir.capacity != SCORE_SAMPLE:
            raise ValueError(f"the reservoir must hold up to {SCORE_SAMPLE} inputs, not {reservoir.capacity}")
        self.reservoir = reservoir
        self._stale = True

    def model_changed(self) -> None:
        """The model changed (new data): the statistics are recomputed on demand."""
        self._stale = True

    def set(self, stats: Optional[dict[str, float]]) -> None:
        """Use ``stats`` until the next change (e.g. a model file's, or an int8 export's own); None: none."""
        if stats is not None and (
            not isinstance(stats, dict) or not all(isinstance(v, (int, float)) for v in stats.values())
        ):
            raise ValueError(f"training score statistics must be a dict of numbers or None, got {stats!r}")
        self._stats = None if stats is None else dict(stats)
        self._stale = False

    def statistics(self, image_scores: Callable[[torch.Tensor], np.ndarray]) -> Optional[dict[str, float]]:
        """The statistics of the sample's image scores (``image_scores``: normalised inputs -> scores)."""
        if self._stale and len(self.reservoir):
            self._stats = score_statistics(image_scores(torch.stack(self.reservoir.items)))
            self._stale = False
        return self._stats


__all__ = ["SCORE_SAMPLE", "TrainingScores", "score_statistics"]
