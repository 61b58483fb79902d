"""CPU threads for the local model's fit and the label-free choice: one intra-op thread per task, tasks side by side.

torch parallelises each CPU op over its intra-op threads. For the many medium-sized ops of the local model (a
Gram and an eigh per chunk of positions, a rotation and a few products per chunk of patches) those threads mostly
synchronise, and on a machine whose cores are busy a thread waiting for a descheduled partner burns its turn: on the
2-core machine of bench/RESULTS.md beside other jobs, the local candidate's likelihood over the lam grid took 9-21 s
on two threads and 5.7-8.3 s on one; a (784, 128, 128) eigh 8-15 s against 2.1 s. So such work runs as independent
chunks (:func:`chunk_map`), each on one thread, as many at a time as torch had threads: both cores busy, no
synchronisation inside a chunk. The results are those of the ops on one thread (rounding aside, the same).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from .memory import release_free_memory

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_inside = 0  # blocks running in one_thread, over all Python threads
_saved = 1  # torch's thread count before the first of them


@contextmanager
def one_thread(tensor: torch.Tensor) -> Iterator[int]:
    """torch's intra-op threads set to one while the block runs, for a CPU ``tensor`` (else nothing changes);
    yields the thread count from before (what the block may use as Python threads).

    Safe from several Python threads at once: the first block in saves the thread count, the last one out restores
    it."""
    global _inside, _saved
    if tensor.device.type != "cpu":
        yield torch.get_num_threads()
        return
    with _lock:
        if _inside == 0:
            _saved = torch.get_num_threads()
            if _saved != 1:
                torch.set_num_threads(1)
        _inside += 1
        before = _saved
    try:
        yield before
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0 and _saved != 1:
                torch.set_num_threads(_saved)


def chunk_map(fn: Callable[[T], R], items: Sequence[T], like: torch.Tensor) -> list[R]:
    """``[fn(item) for item in items]``, for CPU work (``like``'s device): as many items at a time as torch has
    intra-op threads, each on one thread. ``fn`` must not depend on the order the items run in (each writes its own
    part, or returns it: the results come back in the order of ``items``)."""
    if like.device.type != "cpu" or len(items) <= 1 or torch.get_num_threads() == 1:
        return [fn(item) for item in items]

    def single(item: T) -> R:
        torch.set_num_threads(1)  # this Python thread's own OpenMP team: one thread
        return fn(item)

    with one_thread(like) as workers:
        if workers <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            results = list(pool.map(single, items))
    release_free_memory()  # the tasks' temporaries, freed on their threads' heaps (crd_fast/core/memory.py)
    return results


__all__ = ["chunk_map", "one_thread"]
