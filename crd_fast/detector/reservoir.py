"""A fixed-size, seeded uniform random sample of a stream (reservoir sampling, Algorithm R).

The detector keeps such a sample of its training inputs to compute the training score statistics.
Which stream positions the sample holds depends only on the seed and the number of items seen, never
on their content; ``extend_lazily`` uses that to fetch only the items that are kept, which lets a
distributed fit build the very sample a single-process fit would (crd_fast/distributed/detector.py).
"""

from __future__ import annotations

import random
from typing import Callable, Generic, Mapping, Optional, Sequence, TypeVar

T = TypeVar("T")


class Reservoir(Generic[T]):
    """At most ``capacity`` items drawn uniformly from every item added so far, reproducibly for a ``seed``."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._items: list[T] = []
        self._seen = 0
        self._rng = random.Random(seed)

    @property
    def items(self) -> list[T]:
        """The sampled items (a new list; the items themselves are not copied)."""
        return list(self._items)

    @property
    def seen(self) -> int:
        """How many items were added in all."""
        return self._seen

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> "Reservoir[T]":
        """An independent reservoir in the same state (same items, same random stream from here on)."""
        twin: Reservoir[T] = Reservoir(self.capacity)
        twin._items = list(self._items)
        twin._seen = self._seen
        twin._rng.setstate(self._rng.getstate())
        return twin

    def extend(self, items: Sequence[T]) -> None:
        """Add ``items`` in order."""
        self.extend_lazily(len(items), lambda positions: {p: items[p] for p in positions})

    def extend_lazily(self, count: int, fetch: Callable[[list[int]], Mapping[int, T]]) -> None:
        """Add ``count`` items that are produced only if the sample keeps them.

        ``fetch(positions)`` is called exactly once (also when no position is kept), with the sorted
        positions (0 to count - 1 among the new items) that end up in the sample, and must return
        ``{position: item}`` for each of them. The result is that of adding all ``count`` items in order;
        if ``fetch`` raises, the reservoir is left as it was.
        """
        rng = random.Random()
        rng.setstate(self._rng.getstate())  # committed only once ``fetch`` succeeded
        slots: list[Optional[int]] = [None] * len(self._items)  # None: the slot keeps its current item
        seen = self._seen
        for position in range(count):
            seen += 1
            if len(slots) < self.capacity:
                slots.append(position)
            else:
                j = rng.randrange(seen)
                if j < self.capacity:
                    slots[j] = position
        fetched = fetch(sorted({p for p in slots if p is not None}))
        kept = self._items
        self._items = [kept[k] if p is None else fetched[p] for k, p in enumerate(slots)]
        self._seen = seen
        self._rng = rng
