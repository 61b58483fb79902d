"""CRDScorer against the plain formulas: ridge identity, eigen form, rank-r bound, limits, chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_bank

from crd_fast import CRDScorer
from crd_fast.core.projection import crd_lambda, eigen_form, projection_matrix
from crd_fast.ops.reference import crd_scores


def ridge_residual(bank: np.ndarray, y: np.ndarray, lam: float, center: bool) -> np.ndarray:
    """||y - X a*|| with a* = argmin ||y - X a||^2 + n lam ||a||^2, solved directly over the stored bank."""
    n = bank.shape[0]
    mu = bank.mean(axis=0) if center else np.zeros(bank.shape[1])
    X = (bank - mu).T  # d x n
    Y = (y - mu).T  # d x m
    a = np.linalg.solve(X.T @ X + n * lam * np.eye(n), X.T @ Y)
    return np.linalg.norm(Y - X @ a, axis=0)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("d,n", [(2, 3), (2, 40), (7, 4), (7, 50), (64, 20), (64, 300)])
def test_ridge_identity(rng, d, n, center):
    bank = random_bank(rng, n, d, offset=0.7)
    y = random_bank(rng, 25, d, offset=0.7) + rng.standard_normal((25, d))
    scorer = CRDScorer(lam_rel=0.05, center=center).fit(bank)
    c = scorer.covariance.numpy()
    lam = 0.05 * np.trace(c) / d
    assert scorer.lam == pytest.approx(lam, rel=1e-12)
    expected = ridge_residual(bank, y, lam, center)
    np.testing.assert_allclose(scorer.score(y), expected, rtol=1e-8, atol=1e-12)


def test_eigen_form_equals_m_pre(rng):
    bank = random_bank(rng, 200, 32)
    cov = torch.from_numpy(np.cov(bank.T, bias=True))
    lam = crd_lambda(cov, 0.01)
    direct = lam * torch.linalg.inv(cov + lam * torch.eye(32, dtype=torch.float64))
    form = eigen_form(cov, lam)
    eig = form.eigenvectors @ torch.diag(form.shrink) @ form.eigenvectors.T
    torch.testing.assert_close(eig, direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(projection_matrix(cov, lam), direct, rtol=1e-10, atol=1e-12)
    assert bool((form.shrink > 0).all() and (form.shrink <= 1).all())


@pytest.mark.parametrize("rank", [1, 5, 20, 31])
def test_rank_r_obeys_documented_bound(rng, rank):
    bank = random_bank(rng, 500, 32, offset=1.0)
    y = random_bank(rng, 200, 32, offset=1.0) * 1.5
    full = CRDScorer(lam_rel=0.02).fit(bank)
    low = CRDScorer(lam_rel=0.02, rank=rank).fit(bank)
    assert low.projection.matrix.shape == (rank, 32)
    s_full, s_low = full.score(y), low.score(y)
    dist = np.linalg.norm(y - full.mean.numpy(), axis=1)
    gap = s_full - s_low
    assert np.all(gap >= -1e-12)
    assert np.all(gap <= low.error_bound * dist + 1e-12)
    assert 0 < low.error_bound < 1


def test_rank_d_is_full_rank(rng):
    bank = random_bank(rng, 100, 8)
    full = CRDScorer().fit(bank)
    same = CRDScorer(rank=8).fit(bank)
    assert same.error_bound == 0.0
    np.testing.assert_allclose(same.score(bank), full.score(bank), rtol=1e-12)


@pytest.mark.parametrize("center", [True, False])
def test_large_lambda_gives_distance_to_mean(rng, center):
    bank = random_bank(rng, 300, 16, offset=2.0)
    y = random_bank(rng, 50, 16)
    scorer = CRDScorer(lam_rel=1e9, center=center).fit(bank)
    mu = bank.mean(axis=0) if center else 0.0
    np.testing.assert_allclose(scorer.score(y), np.linalg.norm(y - mu, axis=1), rtol=1e-7)


def test_partial_fit_in_random_chunks_equals_fit(rng):
    bank = random_bank(rng, 1000, 24, offset=5.0)
    y = random_bank(rng, 40, 24, offset=5.0)
    whole = CRDScorer().fit(bank)
    for _ in range(3):
        cuts = np.sort(rng.choice(np.arange(1, 1000), size=rng.integers(1, 12), replace=False))
        chunked = CRDScorer()
        for part in np.split(bank, cuts):
            chunked.partial_fit(part)
        assert chunked.n_samples == 1000
        np.testing.assert_allclose(chunked.statistics.mean, whole.statistics.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(chunked.statistics.scatter, whole.statistics.scatter, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(chunked.score(y), whole.score(y), rtol=1e-9)


def test_merge_equals_fit_on_union(rng):
    a, b = random_bank(rng, 300, 12), random_bank(rng, 200, 12, offset=0.5)
    merged = CRDScorer().fit(a).merge(CRDScorer().fit(b))
    whole = CRDScorer().fit(np.concatenate([a, b]))
    y = random_bank(rng, 30, 12)
    np.testing.assert_allclose(merged.score(y), whole.score(y), rtol=1e-10)


def test_float32_input_agrees_with_float64_reference(rng):
    bank = random_bank(rng, 2000, 48, offset=0.3)
    y = random_bank(rng, 500, 48, offset=0.3) * 1.3
    scorer = CRDScorer().fit(bank.astype(np.float32))
    got = scorer.score(torch.from_numpy(y.astype(np.float32)))
    assert got.dtype == torch.float32
    proj = scorer.projection
    ref = crd_scores(torch.from_numpy(y), proj.matrix, proj.offset)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_changing_lam_after_fit_matches_fresh_fit(rng):
    bank = random_bank(rng, 400, 16)
    y = random_bank(rng, 20, 16)
    scorer = CRDScorer(lam_rel=0.01).fit(bank)
    before = scorer.score(y)
    scorer.lam_rel = 0.3
    scorer.center = False
    np.testing.assert_allclose(scorer.score(y), CRDScorer(lam_rel=0.3, center=False).fit(bank).score(y), rtol=1e-12)
    assert not np.allclose(before, scorer.score(y))


def test_memory_does_not_grow_with_training_set(rng):
    def held_bytes(scorer: CRDScorer) -> int:
        stats = scorer.statistics
        return sum(t.numel() * t.element_size() for t in (stats.mean, stats.scatter, scorer.projection.matrix))

    small = CRDScorer().fit(random_bank(rng, 50, 32))
    large = CRDScorer().fit(random_bank(rng, 20000, 32))
    assert held_bytes(small) == held_bytes(large) == 8 * (32 + 2 * 32 * 32)


def test_output_kind_follows_input(rng):
    bank = random_bank(rng, 100, 8)
    scorer = CRDScorer().fit(torch.from_numpy(bank))
    assert isinstance(scorer.score(bank), np.ndarray)
    out = scorer.score(torch.from_numpy(bank).float())
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.shape == (100,)
    assert scorer.score(bank[:0]).shape == (0,)
