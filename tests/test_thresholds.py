"""Thresholds from normal data (quantile) and labelled data (F1-optimal), and score normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crd_fast.metrics.thresholds import f1_threshold, normalize_scores, quantile_threshold


def test_quantile_threshold():
    rng = np.random.default_rng(0)
    s = rng.normal(size=101)
    assert quantile_threshold(s) == pytest.approx(float(np.quantile(s, 0.99)), abs=0)
    assert quantile_threshold(torch.from_numpy(s), q=0.5) == float(np.median(s))
    assert quantile_threshold(s, q=1.0) == s.max()
    with pytest.raises(ValueError, match="q must be"):
        quantile_threshold(s, q=1.5)
    with pytest.raises(ValueError, match="empty"):
        quantile_threshold([])
    with pytest.raises(ValueError, match="non-finite"):
        quantile_threshold([1.0, np.nan])


def _f1(scores, labels, t):
    pred = scores >= t
    tp = np.sum(pred & labels)
    fp = np.sum(pred & ~labels)
    fn = np.sum(~pred & labels)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 40
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + 1.2 * labels
    scores[5] = scores[6]  # ties are handled as one threshold
    t = f1_threshold(scores, labels.astype(int))
    best = max(_f1(scores, labels, c) for c in np.unique(scores))
    assert t in scores
    assert _f1(scores, labels, t) == pytest.approx(best, abs=1e-12)


def test_f1_threshold_errors():
    with pytest.raises(ValueError, match="both"):
        f1_threshold([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="length"):
        f1_threshold([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="0/1"):
        f1_threshold([0.1, 0.2], [0, 2])


def test_normalize_scores():
    stats = {"min": 1.0, "max": 3.0}
    out = normalize_scores([2.0, 4.0, 5.0, 100.0, -50.0], threshold=4.0, stats=stats)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 1.0, 0.0])
    mid = normalize_scores([3.5, 4.0, 4.5], threshold=4.0, stats=stats)
    np.testing.assert_allclose(mid, [0.25, 0.5, 0.75])
    assert normalize_scores([4.0], threshold=4.0, stats=None)[0] == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_f1_threshold_is_the_threshold_of_f1_max(seed):
    """One F1-max: the detector's labelled threshold is the evaluation metric's, for numpy and tensor input."""
    from crd_fast.metrics.scores import f1_max

    rng = np.random.default_rng(100 + seed)
    labels = rng.random(50) < 0.3
    labels[:2] = [True, False]
    scores = rng.normal(size=50).astype(np.float32) + labels
    scores[7] = scores[8]
    _, thr = f1_max(labels, scores)
    assert f1_threshold(scores, labels) == thr
    assert f1_threshold(torch.from_numpy(scores), torch.from_numpy(labels)) == thr
    assert f1_threshold(scores.astype(np.float64), labels.astype(int)) == thr
