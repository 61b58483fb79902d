"""PaDiM's rule (crd_fast/scorers/padim.py) against a dense float64 computation of its definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crd_fast.scorers import PaDiMScorer


def _grids(seed: int, n: int, p: int = 5, d: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(p, d, d, generator=g, dtype=torch.float64)
    return torch.einsum("npd,pkd->npk", torch.randn(n, p, d, generator=g, dtype=torch.float64), mixing) + 2.0


def _dense(train: torch.Tensor, test: torch.Tensor, eps: float) -> np.ndarray:
    out = np.zeros((test.shape[0], train.shape[1]))
    for p in range(train.shape[1]):
        x = train[:, p].numpy()
        cov = np.cov(x, rowvar=False) + eps * np.eye(x.shape[1])
        r = test[:, p].numpy() - x.mean(0)
        out[:, p] = np.sqrt(np.einsum("bi,bi->b", r, np.linalg.solve(cov, r.T).T))
    return out


@pytest.mark.parametrize("eps", [0.01, 1.5])
def test_scores_are_the_mahalanobis_distances_of_the_definition(eps):
    train, test = _grids(1, 12), _grids(2, 4)
    got = PaDiMScorer(eps).fit(train).score(test)
    assert got.dtype == torch.float64 and got.shape == (4, 5)
    np.testing.assert_allclose(got.numpy(), _dense(train, test, eps), rtol=1e-10)


def test_any_batching_gives_the_same_model_and_float32_in_gives_float32_out():
    train, test = _grids(3, 13), _grids(4, 3)
    whole = PaDiMScorer().fit(train)
    parts = PaDiMScorer().fit(train[:2])
    for chunk in (train[2:7], train[7:8], train[8:]):
        parts.partial_fit(chunk)
    torch.testing.assert_close(parts.covariance(), whole.covariance(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(parts.score(test), whole.score(test), rtol=1e-10, atol=0)
    assert whole.score(test.float()).dtype == torch.float32 and parts.n_images == 13
    assert isinstance(whole.score(test.numpy()), np.ndarray)


def test_bad_input_and_too_large_models_are_refused():
    with pytest.raises(ValueError, match="eps"):
        PaDiMScorer(eps=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        PaDiMScorer().fit(_grids(5, 1))
    with pytest.raises(RuntimeError, match="not fitted"):
        PaDiMScorer().score(_grids(5, 2))
    scorer = PaDiMScorer().fit(_grids(6, 4))
    with pytest.raises(ValueError, match="positions"):
        scorer.score(_grids(7, 2, p=6))
    with pytest.raises(MemoryError, match="GiB"):
        PaDiMScorer(max_bytes=1000).fit(_grids(8, 3))
    bad = _grids(9, 3)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN|finite"):
        PaDiMScorer().fit(bad)
