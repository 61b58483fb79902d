"""The scoring models' candidates (crd_fast/scoring/candidates.py) against float64 direct computations."""

import numpy as np
import pytest
import torch

from crd_fast.core import sketch as sketch_module
from crd_fast.core.local import LocalCRDModel, LocalStatistics
from crd_fast.core.stats import PatchStatistics
from crd_fast.scoring import candidates as cands
from crd_fast.scoring.candidates import GlobalCandidate, LocalCandidate

GRID = (1e-4, 3e-3, 0.01, 0.3)


def _local_model(seed: int, positions: int = 6, dim: int = 20, rank: int = 3) -> LocalCRDModel:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T / dim + 0.01 * torch.eye(dim, dtype=torch.float64)
    vectors = torch.linalg.qr(torch.randn(positions, dim, rank, generator=g, dtype=torch.float64))[0]
    values = torch.rand(positions, rank, generator=g, dtype=torch.float64) * 3
    means = torch.randn(positions, dim, generator=g, dtype=torch.float64)
    return LocalCRDModel.build(means, cov, values, vectors, 0.5)


def _dense_local(model: LocalCRDModel, grids: torch.Tensor, lam_rel: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image nll (N,) and patch scores (N, P) from dense float64 (S_p + lam I) per position."""
    u, s, sv = model.eigenvectors, model.eigenvalues, model.scaled_vectors
    cov = u @ (model.shrinkage * torch.diag_embed(s) + sv @ sv.transpose(1, 2)) @ u.T  # (P, d, d)
    sigma = cov + model.lam(lam_rel) * torch.eye(model.dim, dtype=torch.float64)
    r = (grids.double() - model.means).transpose(0, 1)  # (P, N, d)
    solved = torch.linalg.solve(sigma, r.transpose(1, 2)).transpose(1, 2)
    quad = (r * solved).sum(-1)  # (P, N)
    nll = 0.5 * (quad + torch.linalg.slogdet(sigma)[1][:, None]).mean(0) / model.dim
    scores = (model.lam(lam_rel) * torch.linalg.vector_norm(solved, dim=-1)).T
    return nll.numpy(), scores.numpy()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """A few patches at a time, so the chunked loops take several steps on these small grids."""
    monkeypatch.setattr(cands, "_CHUNK_PATCHES", 7)


@pytest.mark.parametrize("vector_dtype", [torch.float64, torch.float32])
def test_local_evaluate_equals_the_dense_likelihood_and_scores(vector_dtype):
    """evaluate(): float64 likelihood of every grid lam (S~ as given, float64 or float32) and float32 scores, against
    dense float64 solves of (S_p + lam I) with that S~."""
    model = _local_model(3)
    model = LocalCRDModel(model.means, model.eigenvalues, model.eigenvectors, model.scaled_vectors.to(vector_dtype),
                          model.shrinkage)  # fmt: skip
    reference = LocalCRDModel(model.means, model.eigenvalues, model.eigenvectors, model.scaled_vectors.double(),
                              model.shrinkage)  # fmt: skip
    g = torch.Generator().manual_seed(4)
    grids = (torch.randn(5, model.positions, model.dim, generator=g, dtype=torch.float64) * 2 + model.means).float()
    got = LocalCandidate(model).evaluate(grids, GRID)
    assert got.nll.shape == (len(GRID), 5) and got.maps.shape == (len(GRID), 5, model.positions)
    assert got.nll.dtype == np.float64 and got.maps.dtype == np.float32
    for i, lam_rel in enumerate(GRID):
        nll, scores = _dense_local(reference, grids, lam_rel)
        np.testing.assert_allclose(got.nll[i], nll, rtol=1e-5, atol=0)
        np.testing.assert_allclose(got.maps[i], scores, rtol=2e-5, atol=0)


def test_local_maps_equal_the_dense_scores():
    """maps(): float32 rotation and scores, within 2e-5 of the dense float64 solve, for lams given in any order."""
    model = _local_model(5)
    g = torch.Generator().manual_seed(6)
    grids = torch.randn(4, model.positions, model.dim, generator=g, dtype=torch.float64) + model.means
    cand = LocalCandidate(model)
    lams = (0.3, 1e-4, 0.01)
    got = cand.maps(grids, lams)
    assert got.shape == (3, 4, model.positions) and got.dtype == np.float32
    for i, lam_rel in enumerate(lams):
        np.testing.assert_allclose(got[i], _dense_local(model, grids, lam_rel)[1], rtol=2e-5, atol=0)
    # the float64 clean scores of evaluate() and the float32 ones of maps() agree
    np.testing.assert_allclose(cand.evaluate(grids, lams).maps, got, rtol=2e-5)


def test_local_candidate_of_one_pass_statistics_in_float32():
    """A model built from statistics with float32 scaled vectors (``from_statistics(dtype=float32)``) is the float64
    one to float32 rounding, and its likelihood stays within 1e-5 of the float64 model's."""
    g = torch.Generator().manual_seed(8)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    grids = torch.randn(30, 5, 12, generator=g, dtype=torch.float64) @ mix
    stats = LocalStatistics(5, 12, sketch=8).update(grids.float())
    exact = LocalCRDModel.from_statistics(stats, 4, 0.5)
    narrow = LocalCRDModel.from_statistics(stats, 4, 0.5, dtype=torch.float32)
    assert narrow.scaled_vectors.dtype == torch.float32 and exact.scaled_vectors.dtype == torch.float64
    torch.testing.assert_close(narrow.scaled_vectors.double(), exact.scaled_vectors, rtol=1e-5, atol=1e-5)
    held = grids[:4].float()
    np.testing.assert_allclose(
        LocalCandidate(narrow).evaluate(held, GRID).nll, LocalCandidate(exact).evaluate(held, GRID).nll, rtol=1e-5
    )


@pytest.mark.parametrize("group", [1, 3, 64])
def test_a_model_built_a_few_positions_at_a_time_is_the_chunks_model(group, monkeypatch):
    """``from_statistics(group=...)`` (the candidate's: fewer positions' float64 rows at a time) gives the model of
    a sketch chunk at a time, to rounding, in float64 and float32, over chunks of several positions."""
    monkeypatch.setattr(sketch_module, "CHUNK_BYTES", 2 * 8 * 12 * 4 * 4)  # 4 positions per chunk
    g = torch.Generator().manual_seed(9)
    grids = torch.randn(20, 11, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g).double()
    stats = LocalStatistics(11, 12, sketch=8).update(grids[:9].float()).update(grids[9:].float())
    assert len(stats.fd.chunk_slices()) == 3 and stats.fd.shrinks > 0
    for dtype in (torch.float64, torch.float32):
        whole = LocalCRDModel.from_statistics(stats, 4, 0.5, dtype=dtype)
        grouped = LocalCRDModel.from_statistics(stats, 4, 0.5, dtype=dtype, group=group)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(grouped.scaled_vectors, whole.scaled_vectors, rtol=tol, atol=tol)


def _global_stats(seed: int, n: int = 300, d: int = 10) -> PatchStatistics:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    return PatchStatistics(d).update(x + 3)


def test_global_evaluate_and_maps_equal_dense_float64():
    stats = _global_stats(9)
    cand = GlobalCandidate(stats, True)
    g = torch.Generator().manual_seed(10)
    grids = (torch.randn(6, 5, 10, generator=g, dtype=torch.float64) * 2 + 3).float()
    got = cand.evaluate(grids, GRID)
    maps = cand.maps(grids, GRID[::-1])
    cov = stats.covariance()
    r = grids.double() - stats.mean
    for i, lam_rel in enumerate(GRID):
        lam = lam_rel * float(torch.trace(cov)) / 10
        sigma = cov + lam * torch.eye(10, dtype=torch.float64)
        solved = torch.linalg.solve(sigma, r.reshape(-1, 10).T).T.reshape(r.shape)
        nll = 0.5 * ((r * solved).sum(-1).mean(1) + torch.linalg.slogdet(sigma)[1]) / 10
        scores = lam * torch.linalg.vector_norm(solved, dim=-1)
        np.testing.assert_allclose(got.nll[i], nll.numpy(), rtol=1e-5)
        np.testing.assert_allclose(got.maps[i], scores.numpy(), rtol=2e-5)
        np.testing.assert_allclose(maps[len(GRID) - 1 - i], scores.numpy(), rtol=2e-5)


def _relu_features(seed: int, n: int, positions: int, dim: int) -> torch.Tensor:
    """(n, P, d) float32 features like a backbone's: ReLU of a mix whose spectrum falls over six decades, a mean
    per position well away from zero."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0] * torch.logspace(0, -3, dim)
    base = torch.randn(positions, dim, generator=g, dtype=torch.float64)
    x = torch.randn(n, positions, dim, generator=g, dtype=torch.float64) @ mix.T + base
    return torch.relu(x).float()


def test_float32_rotations_keep_the_likelihood_within_1e5_over_the_whole_grid():
    """The detector's candidates (float32 rotations, float32 S~) against all-float64 dense solves, at every lam of
    the default grid (down to 1e-5), on features with a steep spectrum."""
    from crd_fast.choices import DEFAULT_LAM_GRID

    train, held = _relu_features(11, 60, 4, 48), _relu_features(12, 6, 4, 48)
    stats = LocalStatistics(4, 48, sketch=16)
    for chunk in torch.split(train, 8):
        stats.update(chunk)
    exact = LocalCRDModel.from_statistics(stats, 8, 0.5)
    got = LocalCandidate(LocalCRDModel.from_statistics(stats, 8, 0.5, dtype=torch.float32)).evaluate(
        held, DEFAULT_LAM_GRID
    )
    pooled = PatchStatistics(48).update(train.reshape(-1, 48))
    got_global = GlobalCandidate(pooled, True).evaluate(held, DEFAULT_LAM_GRID)
    cov = pooled.covariance()
    r = held.double() - pooled.mean
    for i, lam_rel in enumerate(DEFAULT_LAM_GRID):
        nll, scores = _dense_local(exact, held, lam_rel)
        np.testing.assert_allclose(got.nll[i], nll, rtol=1e-5)
        np.testing.assert_allclose(got.maps[i], scores, rtol=2e-5, atol=2e-5 * scores.max())
        sigma = cov + lam_rel * float(torch.trace(cov)) / 48 * torch.eye(48, dtype=torch.float64)
        solved = torch.linalg.solve(sigma, r.reshape(-1, 48).T).T.reshape(r.shape)
        dense = 0.5 * ((r * solved).sum(-1).mean(1) + torch.linalg.slogdet(sigma)[1]) / 48
        np.testing.assert_allclose(got_global.nll[i], dense.numpy(), rtol=1e-5)
