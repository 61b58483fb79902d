"""Timing: best and median of wall-clock rounds, one path at a time or several round-robin."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Timing:
    """Wall-clock seconds of each timed call. ``best`` (the minimum) is the least disturbed by other jobs;
    ``median`` shows how much they disturbed it."""

    times: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def rounds(self) -> int:
        return len(self.times)


def time_call(fn: Callable[[], Any], rounds: int = 5, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``rounds`` times timed."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    for _ in range(warmup):
        fn()
    out = Timing()
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.times.append(time.perf_counter() - t0)
    return out


class RoundRobin:
    """Calling it runs every path once, in turn, timing each: one round of an interleaved comparison.

    On a shared machine the load changes over a run; paths timed round-robin see the same changes, so
    their ratio is fairer than that of paths timed one block after another. ``timings`` holds the rounds.
    """

    def __init__(self, fns: dict[str, Callable[[], Any]]) -> None:
        if not fns:
            raise ValueError("at least one path is needed")
        self.fns = dict(fns)
        self.timings = {name: Timing() for name in self.fns}

    def __call__(self) -> None:
        for name, fn in self.fns.items():
            t0 = time.perf_counter()
            fn()
            self.timings[name].times.append(time.perf_counter() - t0)

    def reset(self) -> None:
        """Forget the rounds so far (e.g. the warm-up)."""
        self.timings = {name: Timing() for name in self.fns}


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time several paths round-robin (a, b, c, a, b, c, ...); see ``RoundRobin``."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    rr = RoundRobin(fns)
    for _ in range(warmup):
        rr()
    rr.reset()
    for _ in range(rounds):
        rr()
    return rr.timings
