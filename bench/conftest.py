"""Shared by the benchmark suites: the run's sizes, and one table of ratios at the end of the run.

Each benchmark records its rounds under the key crd_fast.benchmark.suite uses (``head/concat/fused``,
``e2e/full``, ...) and any sizes or errors in ``extra``; after the run the terminal summary prints
``crd_fast.benchmark.suite.format_table`` of everything measured in this one run, with issue 4's targets.
Paths whose ratio is a target and that are cheap enough (fused vs reference; backbone vs head vs full)
are timed round-robin inside one benchmark, so a change in the shared machine's load hits them alike.

    python -m pytest bench/bench_head.py bench/bench_e2e.py bench/bench_fit.py -s \
        --benchmark-columns=min,median,rounds
    CRD_BENCH_QUICK=1 python -m pytest bench/ ...     # smaller sizes (see BenchConfig.quick)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from crd_fast.benchmark import suite as bm


@dataclass
class Recorder:
    """Best seconds per key and the extra facts ``format_table`` prints."""

    results: dict[str, bm.Timing] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=lambda: {"head_sizes": {}, "errors": {}, "fit": []})

    def record(self, key: str, benchmark: Any) -> Optional[bm.Timing]:
        """Record the rounds of a pytest-benchmark run under ``key``; None when timing is off
        (--benchmark-disable)."""
        stats = getattr(benchmark, "stats", None)
        if stats is None:
            return None
        self.results[key] = bm.Timing(list(stats.stats.data))
        return self.results[key]

    def record_rounds(self, prefix: str, rr: bm.RoundRobin) -> None:
        """Record each path of a round-robin benchmark under ``prefix + name``."""
        for name, timing in rr.timings.items():
            if timing.rounds:
                self.results[prefix + name] = timing


_RECORDER = pytest.StashKey[Recorder]()
_CONFIG = bm.BenchConfig.from_env()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDER] = Recorder(extra={"config": _CONFIG.describe(), "head_sizes": {}, "errors": {}, "fit": []})


@pytest.fixture(scope="session")
def bench_config() -> bm.BenchConfig:
    """The sizes of this run (full, or quick with CRD_BENCH_QUICK=1)."""
    return _CONFIG


@pytest.fixture(scope="session")
def recorder(request: pytest.FixtureRequest) -> Recorder:
    return request.config.stash[_RECORDER]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rec = config.stash.get(_RECORDER, None)
    if rec is None or not rec.results and not rec.extra.get("fit"):
        return
    terminalreporter.section("crd-fast ratio table (this run)")
    terminalreporter.write_line(bm.format_table(rec.results, bm.machine_info(), rec.extra))
