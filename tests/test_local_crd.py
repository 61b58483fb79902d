"""Local (position-aware) CRD: Woodbury scoring and the streaming fit against float64 direct computations
(the scorer and the Frequent Directions guarantee: tests/test_local_scorer.py)."""

import pytest
import torch
from helpers import dense_local_scores

from crd_fast.core.local import (
    LocalCRDModel,
    LocalStatistics,
    local_eigenpairs_from_patches,
    score_deploy_form,
)


def _grids(n=12, p=5, d=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(p, d, generator=g, dtype=torch.float64) * 3  # per-position means differ
    mix = torch.randn(p, d, d, generator=g, dtype=torch.float64) / d**0.5
    x = torch.randn(n, p, d, generator=g, dtype=torch.float64)
    return base + torch.einsum("npd,pde->npe", x, mix)


@pytest.mark.parametrize("a,k", [(0.5, 3), (0.2, 9), (1.0, 2), (0.0, 11)])
def test_woodbury_scores_match_direct_inverse(a, k):
    train, test = _grids(seed=1), _grids(n=4, seed=2)
    means, vals, vecs = local_eigenpairs_from_patches(train, k)
    stats = LocalStatistics(train.shape[1], train.shape[2]).update(train)
    model = LocalCRDModel.build(means, stats.within_covariance(), vals, vecs, a)
    expected = dense_local_scores(train, test, a, min(k, train.shape[2]), 0.05)
    torch.testing.assert_close(model.scores(test, 0.05), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(score_deploy_form(model.deploy_form(0.05), test), expected, rtol=1e-9, atol=1e-12)


def test_full_rank_local_equals_unreduced_shrinkage():
    # k >= N - 1 keeps all of C_p: S_p = a C + (1 - a) C_p exactly.
    train, test = _grids(n=6, d=10, seed=3), _grids(n=3, d=10, seed=4)
    n, p, d = train.shape
    means, vals, vecs = local_eigenpairs_from_patches(train, n)
    stats = LocalStatistics(p, d).update(train)
    model = LocalCRDModel.build(means, stats.within_covariance(), vals, vecs, 0.5)
    xc = train - train.mean(0)
    cps = torch.einsum("npd,npe->pde", xc, xc) / n
    lam = 0.01 * float(torch.trace(cps.mean(0))) / d
    s = 0.5 * cps.mean(0) + 0.5 * cps + lam * torch.eye(d, dtype=torch.float64)
    r = test - train.mean(0)
    expected = lam * torch.linalg.vector_norm(torch.linalg.solve(s, r.permute(1, 2, 0)).permute(2, 0, 1), dim=-1)
    torch.testing.assert_close(model.scores(test, 0.01), expected, rtol=1e-9, atol=1e-12)


def test_streaming_means_and_pooled_covariance_are_exact_for_any_batching():
    train = _grids(n=10, seed=5)
    n, p, d = train.shape
    stats = LocalStatistics(p, d)
    for chunk in torch.split(train.float(), [3, 1, 6]):
        stats.update(chunk)
    train32 = train.float().double()
    torch.testing.assert_close(stats.means, train32.mean(0), rtol=1e-10, atol=1e-12)
    xc = train32 - train32.mean(0)
    expected = torch.einsum("npd,npe->de", xc, xc) / (n * p)
    torch.testing.assert_close(stats.within_covariance(), expected, rtol=1e-10, atol=1e-12)


def test_streaming_eigenpairs_match_the_gram_fit_while_exact():
    # 14 images, sketch 16: fewer than 2 * 16 rows were appended, so the sketch holds the centred data exactly.
    train = _grids(n=14, d=8, seed=6)
    _, p, d = train.shape
    stats = LocalStatistics(p, d, sketch=16)
    for chunk in torch.split(train, 5):
        stats.update(chunk)
    assert stats.fd.shrinks == 0
    vals, vecs = stats.local_eigenpairs(4)
    _, vals_g, vecs_g = local_eigenpairs_from_patches(train, 4)
    torch.testing.assert_close(vals, vals_g, rtol=1e-9, atol=1e-12)
    # eigenvectors up to sign: compare the projectors V E V^T
    torch.testing.assert_close(
        (vecs * vals[:, None]) @ vecs.transpose(1, 2),
        (vecs_g * vals_g[:, None]) @ vecs_g.transpose(1, 2),
        rtol=1e-8,
        atol=1e-10,
    )


def test_lam_change_needs_no_refit():
    train, test = _grids(seed=8), _grids(n=2, seed=9)
    means, vals, vecs = local_eigenpairs_from_patches(train, 3)
    stats = LocalStatistics(train.shape[1], train.shape[2]).update(train)
    model = LocalCRDModel.build(means, stats.within_covariance(), vals, vecs, 0.5)
    z = model.rotate(test)
    for lam_rel in (1e-4, 1e-2, 1.0):
        torch.testing.assert_close(
            model.scores_rotated(z, model.factors(model.lam(lam_rel))),
            dense_local_scores(train, test, 0.5, 3, lam_rel),
            rtol=1e-9,
            atol=1e-12,
        )


def test_bad_input_is_refused():
    stats = LocalStatistics(4, 3)
    with pytest.raises(ValueError, match="has 5 positions, the model has 4"):
        stats.update(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"must be \(images, positions, d\)"):
        stats.update(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        stats.update(torch.full((2, 4, 3), float("nan")))
    with pytest.raises(ValueError, match="no patch grids have been added"):
        stats.local_eigenpairs(2)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        stats.update(torch.randn(3, 4, 3, dtype=torch.float64)).local_eigenpairs(0)
    with pytest.raises(ValueError, match="sketch size ell must be an integer >= 2"):
        LocalStatistics(4, 3, sketch=1)
    means, vals, vecs = local_eigenpairs_from_patches(torch.randn(5, 4, 3, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="shrinkage must be in"):
        LocalCRDModel.build(means, torch.eye(3), vals, vecs, 1.5)
    model = LocalCRDModel.build(means, torch.eye(3, dtype=torch.float64), vals, vecs, 0.5)
    with pytest.raises(ValueError, match="lam_rel must be positive"):
        model.scores(torch.zeros(1, 4, 3), 0.0)


def test_a_shared_pooled_eigendecomposition_gives_the_same_model():
    train, test = _grids(seed=10), _grids(n=2, seed=11)
    means, vals, vecs = local_eigenpairs_from_patches(train, 3)
    cov = LocalStatistics(train.shape[1], train.shape[2]).update(train).within_covariance()
    own = LocalCRDModel.build(means, cov, vals, vecs, 0.3)
    shared = LocalCRDModel.build(means, cov, vals, vecs, 0.3, pooled_eigh=torch.linalg.eigh(cov))
    torch.testing.assert_close(shared.scores(test, 1e-3), own.scores(test, 1e-3), rtol=1e-10, atol=1e-12)
