"""scikit-learn (and PyOD) outlier estimators over the CRD scorer and the nearest-neighbour baseline.

    from crd_fast.integrations.sklearn import CRDOutlierDetector
    det = CRDOutlierDetector(contamination=0.05).fit(X_train)     # rows of normal feature vectors
    det.predict(X_test)            # +1 inlier, -1 outlier (scikit-learn's convention)
    det.score_samples(X_test)      # higher = more normal (minus the CRD score)
    det.decision_scores_, det.threshold_, det.labels_              # PyOD's training attributes

Two conventions meet here, each kept where its users expect it (docs/DESIGN.md "Integrations"):
scikit-learn's methods (``score_samples`` and ``decision_function`` higher = more normal, ``predict`` in
{+1, -1}, ``offset_``) and PyOD's fitted attributes (``decision_scores_`` = raw anomaly scores of the
training rows, higher = more abnormal; ``threshold_`` on that scale; ``labels_`` in {0, 1}).
PyOD's own ``predict`` returns {0, 1}: use ``labels_``-style output through :meth:`predict_labels`.

The CRD model itself keeps only d x d float64 statistics. The threshold needs training *scores*, so a
bounded reservoir of training rows (``max_calibration_rows``) is kept and rescored after every
``partial_fit``: memory stays bounded whatever the stream length.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ..scorers.crd import DEFAULT_LAM_REL, CRDScorer
from ..scorers.nn import NNScorer

__all__ = ["CRDOutlierDetector", "NNOutlierDetector"]


class _ScoreOutlierDetector(OutlierMixin, BaseEstimator):
    """Shared estimator logic: input validation, the calibration reservoir, threshold and predictions.

    Subclasses provide ``_new_scorer()``, the unfitted scorer (anything with ``fit`` and ``score``)."""

    _parameter_constraints: dict[str, list[Any]] = {
        "contamination": [Interval(numbers.Real, 0.0, 0.5, closed="right")],
        "max_calibration_rows": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }
    #: fewest training rows the underlying scorer accepts
    _min_rows = 1

    def _validate(self, X: Any, reset: bool) -> np.ndarray:
        # float64 always: the scorers then compute in float64, so results do not depend on batch layout
        X = validate_data(self, X, reset=reset, dtype=np.float64, ensure_min_samples=self._min_rows if reset else 1)
        return np.array(X, dtype=np.float64, order="C", copy=True)  # writable, owned (torch needs both)

    def fit(self, X: Any, y: Any = None) -> "_ScoreOutlierDetector":
        """Fit on normal rows ``X`` (n_samples, n_features); ``y`` is ignored (pipelines pass it)."""
        self._validate_params()
        X = self._validate(X, reset=True)
        self.scorer_ = self._new_scorer().fit(X)
        self._rng = np.random.default_rng(self.random_state if isinstance(self.random_state, int) else None)
        self._calibration = np.empty((0, X.shape[1]))
        self._seen = 0
        self._remember(X)
        self._calibrate()
        return self

    def _remember(self, X: np.ndarray) -> None:
        """Reservoir sampling (Algorithm R) of at most ``max_calibration_rows`` training rows."""
        cap = self.max_calibration_rows
        room = max(0, cap - len(self._calibration))
        kept = [self._calibration, X[:room]]
        rest = X[room:]
        self._seen += min(room, len(X))
        sample = np.concatenate(kept) if room else self._calibration.copy()
        for row in rest:
            self._seen += 1
            j = int(self._rng.integers(self._seen))
            if j < cap:
                sample[j] = row
        self._calibration = sample

    def _anomaly_scores_for_calibration(self) -> np.ndarray:
        return self._anomaly_scores(self._calibration)

    def _calibrate(self) -> None:
        scores = self._anomaly_scores_for_calibration()
        self.decision_scores_ = scores
        self.threshold_ = float(np.quantile(scores, 1.0 - self.contamination))
        self.offset_ = -self.threshold_
        self.labels_ = (scores > self.threshold_).astype(int)

    def _anomaly_scores(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.scorer_.score(X), dtype=np.float64)

    def anomaly_score(self, X: Any) -> np.ndarray:
        """Raw anomaly scores (higher = more abnormal), the scale of ``decision_scores_`` and ``threshold_``."""
        check_is_fitted(self)
        return self._anomaly_scores(self._validate(X, reset=False))

    def score_samples(self, X: Any) -> np.ndarray:
        """Opposite of the anomaly score: higher = more normal (scikit-learn's convention)."""
        return -self.anomaly_score(X)

    def decision_function(self, X: Any) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for outliers, positive for inliers."""
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:
        """+1 for inliers, -1 for outliers (scores above ``threshold_``)."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def predict_labels(self, X: Any) -> np.ndarray:
        """PyOD's labels: 1 for outliers, 0 for inliers."""
        return (self.predict(X) == -1).astype(int)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class CRDOutlierDetector(_ScoreOutlierDetector):
    """Outlier detector scoring rows by the Collaborative Representation Distance (:class:`CRDScorer`).

    Args:
        lam_rel, center, rank: as :class:`crd_fast.CRDScorer`.
        contamination: expected share of outliers in the training data, in (0, 0.5]; sets ``threshold_``
            at that upper quantile of the training scores.
        max_calibration_rows: training rows kept (reservoir sample) to place the threshold.
        random_state: seed of the reservoir sample.

    ``partial_fit`` adds rows to the model; the result equals one ``fit`` on all rows (the statistics
    are exact), and the threshold is recomputed on the reservoir.
    """

    _parameter_constraints = {
        **_ScoreOutlierDetector._parameter_constraints,
        "lam_rel": [Interval(numbers.Real, 0.0, None, closed="neither")],
        "center": ["boolean"],
        "rank": [Interval(numbers.Integral, 1, None, closed="left"), None],
    }
    _min_rows = 2

    def __init__(
        self,
        lam_rel: float = DEFAULT_LAM_REL,
        center: bool = True,
        rank: Optional[int] = None,
        contamination: float = 0.1,
        max_calibration_rows: int = 10_000,
        random_state: Optional[int] = 0,
    ) -> None:
        self.lam_rel = lam_rel
        self.center = center
        self.rank = rank
        self.contamination = contamination
        self.max_calibration_rows = max_calibration_rows
        self.random_state = random_state

    def _new_scorer(self) -> CRDScorer:
        rank = None if self.rank is None else int(self.rank)
        return CRDScorer(lam_rel=float(self.lam_rel), center=bool(self.center), rank=rank)

    def partial_fit(self, X: Any, y: Any = None) -> "CRDOutlierDetector":
        """Add normal rows to the fit (the first call fits); ``y`` is ignored."""
        if not hasattr(self, "scorer_"):
            return self.fit(X, y)
        X = self._validate(X, reset=False)
        self.scorer_.partial_fit(X)
        self._remember(X)
        self._calibrate()
        return self


class NNOutlierDetector(_ScoreOutlierDetector):
    """The baseline: distance to the nearest training row (exact 1-NN, :class:`crd_fast.NNScorer`).

    Args:
        subsample: fraction of training rows kept in the memory bank (None keeps all).
        backend: "auto", "faiss" or "torch" (see :class:`crd_fast.NNScorer`).
        contamination, max_calibration_rows, random_state: as :class:`CRDOutlierDetector`.

    The training rows score 0 against a bank that holds them, so the threshold is placed on
    leave-one-out distances inside the calibration reservoir (each row's distance to its nearest *other*
    reservoir row); with more training rows than ``max_calibration_rows`` this overestimates the
    test-time distances slightly (a smaller reference set), which errs towards fewer false alarms.
    """

    _parameter_constraints = {
        **_ScoreOutlierDetector._parameter_constraints,
        "subsample": [Interval(numbers.Real, 0.0, 1.0, closed="right"), None],
        "backend": [StrOptions({"auto", "faiss", "torch"})],
    }
    _min_rows = 2

    def __init__(
        self,
        subsample: Optional[float] = None,
        backend: str = "auto",
        contamination: float = 0.1,
        max_calibration_rows: int = 10_000,
        random_state: Optional[int] = 0,
    ) -> None:
        self.subsample = subsample
        self.backend = backend
        self.contamination = contamination
        self.max_calibration_rows = max_calibration_rows
        self.random_state = random_state

    def _new_scorer(self) -> NNScorer:
        seed = self.random_state if isinstance(self.random_state, int) else 0
        return NNScorer(subsample=self.subsample, backend=self.backend, seed=seed)

    def _anomaly_scores_for_calibration(self) -> np.ndarray:
        # Leave-one-out inside the reservoir: a training row's own copy in the bank would score 0.
        rows = self._calibration
        if len(rows) < 2:
            return np.zeros(len(rows))
        sq = (rows * rows).sum(1)
        out = np.empty(len(rows))
        for start in range(0, len(rows), 1024):  # bounded memory: 1024 x n distances at a time
            block = rows[start : start + 1024]
            d2 = sq[start : start + 1024, None] - 2.0 * block @ rows.T + sq[None, :]
            d2[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
            out[start : start + 1024] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
        return out
