"""Which inputs each rank handles.

Sharding is by position in the full, ordered input list, so every rank computes its share from the same
list without talking to the others. Two layouts:

- ``"strided"`` (the default): rank r takes items r, r + W, r + 2W, ... Neighbouring items (often
  similar images, or a folder sorted by size) are spread over the ranks, which balances the load.
- ``"contiguous"``: rank r takes one block of consecutive items; the first ``n % W`` ranks take one
  item more. Useful when items are cheaper to read in runs (one archive per block).

Either way the shards are disjoint, cover every item exactly once, and a rank may get none.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")

SHARD_MODES = ("strided", "contiguous")


def shard_indices(n_items: int, rank: int, world_size: int, mode: str = "strided") -> list[int]:
    """Indices (into the full list of ``n_items``) that ``rank`` of ``world_size`` handles, ascending."""
    if not isinstance(n_items, int) or n_items < 0:
        raise ValueError(f"n_items must be a non-negative integer, got {n_items!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if mode == "strided":
        return list(range(rank, n_items, world_size))
    if mode == "contiguous":
        base, extra = divmod(n_items, world_size)
        start = rank * base + min(rank, extra)
        return list(range(start, start + base + (1 if rank < extra else 0)))
    raise ValueError(f"shard mode must be one of {SHARD_MODES}, got {mode!r}")


def shard(items: Sequence[T], rank: int, world_size: int, mode: str = "strided") -> tuple[list[int], list[T]]:
    """(global indices, items) of ``rank``'s shard of the ordered sequence ``items``."""
    indices = shard_indices(len(items), rank, world_size, mode)
    return indices, [items[i] for i in indices]
