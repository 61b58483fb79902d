"""The fit's batch scatter: BLAS's symmetric rank-k update (``scatter_of``) against the plain float64 product,
and the batch's NaN/Inf check (``all_finite``) against ``isfinite().all()``.

    python -m pytest bench/suites/bench_scatter.py -s --benchmark-columns=min,median,rounds

One batch of 8 wide_resnet50_2 images at 224 px as the fit sees it: 6272 centred patches of d = 1536, float64;
both paths timed round-robin, 5 rounds. Prints the ratio (docs/DESIGN.md "Statistics and merging").
"""

from __future__ import annotations

import json

import torch

from crd_fast.benchmark.machine import machine_info
from crd_fast.benchmark.timing import RoundRobin
from crd_fast.core.precision import cpu_flags
from crd_fast.core.stats import scatter_of

ROWS, DIM, ROUNDS = 6272, 1536, 5


def test_scatter_syrk_vs_plain_product(benchmark) -> None:
    gen = torch.Generator().manual_seed(0)
    centred = torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64)
    centred -= centred.mean(dim=0)
    rr = RoundRobin({"syrk": lambda: scatter_of(centred), "plain": lambda: centred.T @ centred})
    rr()
    rr.reset()
    benchmark.group = f"batch scatter ({ROWS}, {DIM}) float64"
    benchmark.pedantic(rr, rounds=ROUNDS, warmup_rounds=0)
    best = {name: t.best for name, t in rr.timings.items()}
    out = {
        "machine": machine_info(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni"))),
        "seconds_best": best,
        "syrk_speedup_best": best["plain"] / best["syrk"],
        "syrk_speedup_median": rr.timings["plain"].median / rr.timings["syrk"].median,
    }
    print(json.dumps(out, indent=1))
    benchmark.extra_info["syrk_speedup_best"] = out["syrk_speedup_best"]


def test_finite_check_aminmax_vs_isfinite(benchmark) -> None:
    """The NaN/Inf check each fit batch passes through (crd_fast/core/finite.py): one NaN-propagating
    ``torch.aminmax`` against ``isfinite(t).all()``, on one batch's (6272, 1536) float32 patches."""
    from crd_fast.core.finite import all_finite

    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(ROWS, DIM, generator=gen)
    rr = RoundRobin({"aminmax": lambda: all_finite(batch), "isfinite": lambda: bool(torch.isfinite(batch).all())})
    rr()
    rr.reset()
    benchmark.group = f"finite check ({ROWS}, {DIM}) float32"
    benchmark.pedantic(rr, rounds=ROUNDS * 4, warmup_rounds=0)
    best = {name: t.best for name, t in rr.timings.items()}
    out = {
        "machine": machine_info(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni"))),
        "ms_best": {name: 1e3 * s for name, s in best.items()},
        "aminmax_speedup_best": best["isfinite"] / best["aminmax"],
        "aminmax_speedup_median": rr.timings["isfinite"].median / rr.timings["aminmax"].median,
    }
    print(json.dumps(out, indent=1))
    benchmark.extra_info["aminmax_speedup_best"] = out["aminmax_speedup_best"]
