"""The project's speed targets, checked on the ratios of one benchmark run (the suites here print them).

The targets are the project's goals on the CPU, not part of the package: ``crd_fast.benchmark`` measures
and prints the ratio table; this module says whether the ratios reach the goals:

* the fused CPU head at least 1.6x faster than the unfused float32 reference path (d=1536);
* the CRD head at least 140x faster than the fastest exact NN search over a 100% memory bank of 200
  training images (156,800 patches);
* the CRD head at most 10% of the detector's end-to-end time (wide_resnet50_2, batch 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from crd_fast.benchmark.config import SCORE_RTOL
from crd_fast.benchmark.table import Results, head_key, nn_name
from crd_fast.benchmark.timing import Timing

TARGET_FUSED_SPEEDUP = 1.6
TARGET_NN_SPEEDUP = 140.0
TARGET_HEAD_SHARE = 0.10
#: The NN bank of the NN target: 100% of the patches of 200 training images of 784 patches.
TARGET_BANK_PATCHES = 200 * 784


@dataclass
class Target:
    """One target: the measured value from best times (None: not measured), the same ratio from median
    times, the bound, and a caveat."""

    name: str
    value: Optional[float]
    threshold: float
    higher_is_better: bool = True
    note: str = ""
    median_value: Optional[float] = None
    comparable: bool = True  # False: measured at other sizes than the target's (a quick run)

    @property
    def met(self) -> Optional[bool]:
        if self.value is None or not self.comparable:
            return None
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def _show(self, v: float) -> str:
        return f"{v * 100:.1f}%" if not self.higher_is_better else f"{v:.1f}x"

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        goal = f"{self.threshold * 100:g}%" if not self.higher_is_better else f"{self.threshold:g}x"
        if self.value is None:
            return f"  [not measured] {self.name} (target {sign} {goal})"
        median = f", {self._show(self.median_value)} from medians" if self.median_value is not None else ""
        note = f" [{self.note}]" if self.note else ""
        verdict = "not comparable" if not self.comparable else ("met" if self.met else "MISSED")
        return f"  [{verdict}] {self.name}: {self._show(self.value)}{median} (target {sign} {goal}){note}"


def fastest_nn(results: Results, embedding: str, fraction: float) -> Optional[tuple[str, Timing]]:
    """(backend, timing) of the faster (by best time) exact NN search measured for this bank."""
    found = [
        (b, results[head_key(embedding, nn_name(b, fraction))])
        for b in ("faiss", "torch")
        if head_key(embedding, nn_name(b, fraction)) in results
    ]
    return min(found, key=lambda t: t[1].best) if found else None


def _ratio(num: Optional[Timing], den: Optional[Timing]) -> tuple[Optional[float], Optional[float]]:
    if num is None or den is None:
        return None, None
    return num.best / den.best, num.median / den.median


def targets(results: Results, extra: Optional[dict[str, Any]] = None) -> list[Target]:
    """The CPU targets from the timings keyed as the benchmarks key them (``extra``: run sizes, as for
    ``crd_fast.benchmark.table.format_table``)."""
    extra = extra or {}
    fused = results.get(head_key("concat", "fused"))
    nn = fastest_nn(results, "concat", 1.0)
    sizes = extra.get("head_sizes", {}).get("concat")
    bank_note = ""
    if sizes and sizes[1] != TARGET_BANK_PATCHES:
        bank_note = f"bank of {sizes[1]:,} patches, the target is defined for {TARGET_BANK_PATCHES:,}"
    e2e = extra.get("e2e", {})
    e2e_note = (
        ""
        if e2e.get("backbone", "wide_resnet50_2") == "wide_resnet50_2" and e2e.get("batch", 8) == 8
        else f"{e2e.get('backbone')} batch {e2e.get('batch')}, the target is for wide_resnet50_2 batch 8"
    )
    err = extra.get("errors", {}).get("concat")
    err_note = (
        "" if err is None else (f"scores within {err:.1e} relative" + ("" if err <= SCORE_RTOL else " - TOO FAR"))
    )
    speedup = _ratio(results.get(head_key("concat", "reference")), fused)
    nn_speedup = _ratio(nn[1] if nn else None, fused)
    share = _ratio(results.get("e2e/head"), results.get("e2e/full"))
    return [
        Target(
            "fused CPU head vs float32 reference path (d=1536)",
            speedup[0],
            TARGET_FUSED_SPEEDUP,
            note=err_note,
            median_value=speedup[1],
        ),
        Target(
            f"CRD head (fused, full rank) vs fastest exact NN ({nn[0] if nn else '-'}), 100% bank (d=1536)",
            nn_speedup[0],
            TARGET_NN_SPEEDUP,
            note=bank_note,
            median_value=nn_speedup[1],
            comparable=not bank_note,
        ),
        Target(
            "CRD head share of end-to-end time",
            share[0],
            TARGET_HEAD_SHARE,
            higher_is_better=False,
            note=e2e_note,
            median_value=share[1],
            comparable=not e2e_note,
        ),
    ]


def format_targets(results: Results, extra: Optional[dict[str, Any]] = None) -> str:
    """The targets section printed under the ratio table."""
    lines = ["Targets (ratios of best-of-rounds times measured in this run; the same from medians):"]
    lines.extend(t.line() for t in targets(results, extra))
    return "\n".join(lines)
