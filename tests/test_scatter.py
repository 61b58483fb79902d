"""The scatter product of the float64 statistics: BLAS's symmetric rank-k update against the plain product."""

import pytest
import torch
from threadpoolctl import threadpool_info

from crd_fast.core.stats import SYRK_MIN_DIM, PatchStatistics, scatter_of


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.mark.parametrize("rows, dim", [(500, SYRK_MIN_DIM), (97, 300), (40, 130), (3, SYRK_MIN_DIM - 1)])
def test_scatter_equals_the_plain_product_and_is_exactly_symmetric(rows, dim):
    gen = torch.Generator().manual_seed(rows * 1000 + dim)
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64) * torch.rand(dim, generator=gen, dtype=torch.float64)
    got = scatter_of(x)
    want = x.T @ x
    assert got.shape == (dim, dim) and got.dtype == torch.float64
    assert torch.equal(got, got.T)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_scatter_of_a_non_contiguous_view():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(200, 2 * SYRK_MIN_DIM, generator=gen, dtype=torch.float64)
    view = base[:, ::2]
    assert not view.is_contiguous()
    assert torch.allclose(scatter_of(view), view.T @ view, rtol=1e-12, atol=1e-10)


def test_scatter_runs_with_torch_thread_count_and_restores_blas_threads():
    before = _blas_threads()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x = torch.randn(300, 2 * SYRK_MIN_DIM, dtype=torch.float64)
        assert torch.allclose(scatter_of(x), x.T @ x, rtol=1e-12, atol=1e-9)
    finally:
        torch.set_num_threads(threads)
    assert _blas_threads() == before


def test_statistics_update_equals_a_dense_float64_scatter_for_any_chunking():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 96, generator=gen, dtype=torch.float64) + 5.0
    whole = PatchStatistics(96).update(x)
    parts = PatchStatistics(96)
    for chunk in torch.split(x, 333):
        parts.update(chunk.float())  # float32 batches, as the backbone gives them
    centred = x - x.mean(dim=0)
    want = centred.T @ centred
    scale = float(want.abs().max())
    assert torch.allclose(whole.scatter, want, rtol=0, atol=1e-12 * scale)
    x32 = x.float().double()
    c32 = x32 - x32.mean(dim=0)
    assert torch.allclose(parts.scatter, c32.T @ c32, rtol=0, atol=1e-11 * scale)
    assert torch.equal(whole.scatter, whole.scatter.T)


def test_update_and_merge_leave_their_inputs_and_earlier_tensors_alone():
    # update() centres a float64 copy in place and merge() sums into fresh tensors: the caller's batch (even
    # one already float64), the other statistics, and the tensors held before the call (the scorer keeps them
    # to roll back an overflow) must come out unchanged
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 2 * SYRK_MIN_DIM, generator=gen, dtype=torch.float64) + 3.0
    x_before = x.clone()
    stats = PatchStatistics(x.shape[1]).update(x[:100])
    held = (stats.mean, stats.scatter, stats.mean.clone(), stats.scatter.clone())
    stats.update(x[100:])
    assert torch.equal(x, x_before)
    assert torch.equal(held[0], held[2]) and torch.equal(held[1], held[3])
    other = PatchStatistics(x.shape[1]).update(x[:50])
    other_scatter = other.scatter.clone()
    merged = PatchStatistics(x.shape[1]).update(x[50:]).merge(other)
    assert torch.equal(other.scatter, other_scatter)
    whole = PatchStatistics(x.shape[1]).update(x)
    scale = float(whole.scatter.abs().max())
    assert torch.allclose(merged.scatter, whole.scatter, rtol=0, atol=1e-12 * scale)
    assert torch.equal(merged.scatter, merged.scatter.T) and torch.equal(stats.scatter, stats.scatter.T)
    assert torch.equal(_scatter_in_chunks(x), _scatter_in_chunks(x).T)


def _scatter_in_chunks(x: torch.Tensor) -> torch.Tensor:
    """The scatter of ``x`` added in uneven float32 chunks (every merge after the first has a mean shift)."""
    stats = PatchStatistics(x.shape[1])
    for chunk in torch.split(x, 37):
        stats.update(chunk.float())
    return stats.scatter
