"""The scoring models' candidates (crd_fast/scoring/candidates.py) against float64 direct computations."""

import numpy as np
import pytest
import torch

from crd_fast.core.local import LocalCRDModel
from crd_fast.scoring.candidates import LocalCandidate, LocalRotated


def _local_model(seed: int, positions: int = 6, dim: int = 20, rank: int = 3) -> LocalCRDModel:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T / dim + 0.01 * torch.eye(dim, dtype=torch.float64)
    vectors = torch.linalg.qr(torch.randn(positions, dim, rank, generator=g, dtype=torch.float64))[0]
    values = torch.rand(positions, rank, generator=g, dtype=torch.float64) * 3
    means = torch.randn(positions, dim, generator=g, dtype=torch.float64)
    return LocalCRDModel.build(means, cov, values, vectors, 0.5)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_local_maps_equal_the_dense_woodbury_free_scores(dtype, rtol):
    """maps() (float64 or float32 operands) against lam ||(S_p + lam I)^-1 (y - mu_p)|| by a dense float64 solve."""
    model = _local_model(3)
    cand = LocalCandidate(model)
    g = torch.Generator().manual_seed(4)
    grids = torch.randn(5, model.positions, model.dim, generator=g, dtype=torch.float64) * 2 + model.means
    rotated = cand.rotate(grids, dtype)
    assert rotated.by_position.dtype == dtype and (rotated.squares is None) == (dtype == torch.float32)
    u, s, sv = model.eigenvectors, model.eigenvalues, model.scaled_vectors
    cov = u @ (model.shrinkage * torch.diag_embed(s) + sv @ sv.transpose(1, 2)) @ u.T  # (P, d, d)
    eye = torch.eye(model.dim, dtype=torch.float64)
    for lam_rel in (1e-4, 0.01, 0.3):
        lam = model.lam(lam_rel)
        r = (grids - model.means).transpose(0, 1)  # (P, N, d)
        solved = torch.linalg.solve(cov + lam * eye, r.transpose(1, 2)).transpose(1, 2)
        dense = (lam * torch.linalg.vector_norm(solved, dim=-1)).T.numpy()  # (N, P)
        got = cand.maps(rotated, lam_rel)
        assert got.shape == (5, model.positions)
        np.testing.assert_allclose(got, dense, rtol=rtol, atol=0)


def test_float32_rotation_joins_a_float64_one_for_maps():
    model = _local_model(5)
    cand = LocalCandidate(model)
    g = torch.Generator().manual_seed(6)
    a = torch.randn(3, model.positions, model.dim, generator=g, dtype=torch.float64)
    b = torch.randn(2, model.positions, model.dim, generator=g, dtype=torch.float64)
    both = cand.maps_input(cand.rotate(a), b)  # clean rotated in float64, pseudo-defects rotated in float32
    assert both.squares is None and both.by_position.shape == (model.positions, 5, model.dim)
    assert both.by_position.dtype == torch.float32
    exact = cand.maps(LocalRotated(None, torch.cat([cand.rotate(a).by_position, cand.rotate(b).by_position], 1)), 0.01)
    np.testing.assert_allclose(cand.maps(both, 0.01), exact, rtol=2e-5)
