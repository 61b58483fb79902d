"""Shared by the benchmark suites: the run's sizes, and one table of ratios at the end of the run.

Each benchmark records its rounds under the key crd_fast.benchmark.table uses (``head/concat/fused``,
``e2e/full``, ...) and any sizes or errors in ``extra``; after the run the terminal summary prints
``crd_fast.benchmark.table.format_table`` of everything measured in this one run, and the project's speed
targets checked on those ratios (``targets.py`` here).
Paths whose ratio is a target and that are cheap enough (fused vs reference; backbone vs head vs full)
are timed round-robin inside one benchmark, so a change in the shared machine's load hits them alike.

    python -m pytest bench/suites/bench_head.py bench/suites/bench_e2e.py bench/suites/bench_fit.py -s \
        --benchmark-columns=min,median,rounds
    CRD_BENCH_QUICK=1 python -m pytest bench/suites ...     # smaller sizes (see BenchConfig.quick)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from targets import format_targets  # targets.py here: the targets are the suites', not the package's

from crd_fast.benchmark.config import BenchConfig
from crd_fast.benchmark.machine import machine_info, require_fused_cpu_pass
from crd_fast.benchmark.table import format_table
from crd_fast.benchmark.timing import RoundRobin, Timing


@dataclass
class Recorder:
    """Best seconds per key and the extra facts ``format_table`` prints."""

    results: dict[str, Timing] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=lambda: {"head_sizes": {}, "errors": {}, "fit": []})

    def record(self, key: str, benchmark: Any) -> Optional[Timing]:
        """Record the rounds of a pytest-benchmark run under ``key``; None when timing is off
        (--benchmark-disable)."""
        stats = getattr(benchmark, "stats", None)
        if stats is None:
            return None
        self.results[key] = Timing(list(stats.stats.data))
        return self.results[key]

    def record_rounds(self, prefix: str, rr: RoundRobin) -> None:
        """Record each path of a round-robin benchmark under ``prefix + name``."""
        for name, timing in rr.timings.items():
            if timing.rounds:
                self.results[prefix + name] = timing


_RECORDER = pytest.StashKey[Recorder]()
_CONFIG = BenchConfig.from_env()


def pytest_configure(config: pytest.Config) -> None:
    require_fused_cpu_pass()  # never time the fallback by accident (a source tree shadowing the build)
    config.stash[_RECORDER] = Recorder(extra={"config": _CONFIG.describe(), "head_sizes": {}, "errors": {}, "fit": []})


@pytest.fixture(scope="session")
def bench_config() -> BenchConfig:
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
    terminalreporter.write_line(format_table(rec.results, machine_info(), rec.extra))
    terminalreporter.write_line("")
    terminalreporter.write_line(format_targets(rec.results, rec.extra))
