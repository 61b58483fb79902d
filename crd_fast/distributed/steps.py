"""The collective steps every distributed fit is made of: fit each rank's shard, add the statistics of
all ranks, write the result on rank 0 only. Used by ``fit.py`` (scorers) and ``detector.py`` (detectors).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch.distributed as dist

from ..core.stats import PatchStatistics
from .reduce import _combine, exchange_status, raise_if_any_failed, rank_and_world
from .sharding import shard


def copy_statistics(stats: PatchStatistics) -> PatchStatistics:
    """An independent copy (merging into it leaves ``stats`` as it was)."""
    return PatchStatistics.from_tensors(stats.count, stats.mean, stats.scatter)


def fit_shards(
    items: Sequence[Any],
    group: Optional[dist.ProcessGroup],
    shard_mode: str,
    what: str,
    fit_shard: Callable[[list[int], list[Any]], Optional[PatchStatistics]],
) -> tuple[list[int], PatchStatistics]:
    """This rank's shard of ``items`` through ``fit_shard(indices, shard)``, the statistics of all ranks added.

    Returns (this rank's global indices, the combined statistics). An exception in ``fit_shard`` on any
    rank is reported to every rank by ``_combine`` (so none waits in a collective) and raised on all.
    """
    rank, world = rank_and_world(group)
    error: Optional[BaseException] = None
    local: Optional[PatchStatistics] = None
    indices: list[int] = []
    try:
        indices, mine = shard(items, rank, world, shard_mode)
        local = fit_shard(indices, mine)
    except Exception as exc:  # reported to every rank by _combine, so none waits in a collective
        error = exc
    return indices, _combine(local, group, what, error)


def save_on_rank0(write: Any, group: Optional[dist.ProcessGroup], what: str) -> None:
    """Run ``write()`` on rank 0 only, then tell every rank whether it worked (all raise if not)."""
    rank, _ = rank_and_world(group)
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            write()
        except Exception as exc:
            error = exc
    status = exchange_status(error is None, 0, 0, group)
    raise_if_any_failed(status, what, error)
