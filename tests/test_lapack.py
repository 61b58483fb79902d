"""crd_fast/core/lapack.py and threads.py: LAPACK on one thread gives torch's results, the thread count comes back,
chunk_map gives the results of a loop."""

import threading

import pytest
import torch

from crd_fast.core import lapack, threads


def _spd(seed: int, batch: tuple = (), n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    return a @ a.transpose(-1, -2) + n * torch.eye(n, dtype=torch.float64)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_calls_give_torchs_results(two_threads):
    a = _spd(0, (5,))
    values, vectors = lapack.eigh(a)
    back = vectors @ torch.diag_embed(values) @ vectors.transpose(-1, -2)
    torch.testing.assert_close(back, a, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a), rtol=1e-12, atol=1e-10)
    chol = lapack.cholesky(a)
    torch.testing.assert_close(chol @ chol.transpose(-1, -2), a, rtol=1e-12, atol=1e-10)
    eye = torch.eye(24, dtype=torch.float64).expand(5, 24, 24)
    torch.testing.assert_close(lapack.cholesky_inverse(chol) @ a, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(lapack.inv(a) @ a, eye, rtol=0, atol=1e-10)
    assert torch.get_num_threads() == 2


def test_one_thread_inside_and_the_count_restored_from_several_threads(two_threads):
    """Blocks entered and left from several Python threads in any order: one thread while any is inside, the
    count of before once all have left (no thread restores it while another is still inside)."""
    inside, barrier = [], threading.Barrier(3)
    first_out = threading.Event()

    def work(wait_for_first: bool) -> None:
        with threads.one_thread(torch.zeros(1)):
            barrier.wait()
            if wait_for_first:
                first_out.wait(timeout=10)
            inside.append(torch.get_num_threads())
        if not wait_for_first:
            first_out.set()

    workers = [threading.Thread(target=work, args=(i > 0,)) for i in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert inside == [1, 1, 1]
    assert torch.get_num_threads() == 2
    with threads.one_thread(torch.zeros(1, device="meta")):  # not a CPU tensor: nothing changes
        assert torch.get_num_threads() == 2


def test_chunk_map_is_the_loop_and_restores_the_threads(two_threads):
    seen = []

    def work(i: int) -> int:
        seen.append(torch.get_num_threads())
        return i * i

    assert threads.chunk_map(work, range(7), torch.zeros(1)) == [i * i for i in range(7)]
    assert seen == [1] * 7  # each task on one intra-op thread
    assert torch.get_num_threads() == 2
    assert threads.chunk_map(work, [3], torch.zeros(1)) == [9]  # one item: run here
