"""``crd-fast bench``: the ratio table to read before choosing crd-fast (via crd_fast.benchmark)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..benchmark.config import PARTS  # torch-free, so --help does not import torch
from .options import command, echo

EPILOG = """\
what is compared (all on this machine, in this one run; times are the best of a few rounds):
  head   the fused CRD head vs the unfused float32 reference path vs exact nearest-neighbour search
         (faiss IndexFlatL2 and chunked torch matmul) over memory banks of 1%, 10% and 100% of the
         patches of 200 training images (156,800 patches), d=1536 ("concat") and d=1024 ("patchcore"),
         all on the same random wide_resnet50_2-shaped feature maps (8 query images)
  e2e    images/s of the whole detector (backbone + head + anomaly map) vs the backbone alone
         (wide_resnet50_2, seeded random weights, 224 px, batch 8): the head's share of the time
  fit    patches/s and peak memory of fitting 50, 200 and 1,000 images (one process per size):
         CRD memory stays flat while an NN memory bank grows with the training set
The full run takes 15 to 25 minutes on 2 cores (exact NN over the 100% bank is the slow part);
--quick takes two minutes or so with smaller sizes (its NN bank is 15,680 patches, not 156,800, so its
NN ratio is far below the full run's).
Features and weights are random (nothing is downloaded): speed does not depend on their values.

examples:
  crd-fast bench --quick
  crd-fast bench --only head --json bench.json
"""


def register(sub: Any) -> None:
    with command(
        sub,
        "bench",
        epilog=EPILOG,
        run=run,
        help="measure crd-fast against exact nearest-neighbour search on this machine",
        description="Time the CRD head, exact nearest-neighbour search, the whole detector and fitting "
        "on this machine, side by side in one run, and print the ratios.",
    ) as p:
        p.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds: two minutes or so")
        p.add_argument(
            "--only",
            action="append",
            choices=PARTS,
            metavar="PART",
            help=f"run only this part ({', '.join(PARTS)}); repeat for several (default: all)",
        )
        p.add_argument(
            "--json", metavar="FILE", help="also write every timing, the machine and the sizes to FILE (JSON)"
        )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmark.config import BenchConfig
    from ..benchmark.machine import describe_machine, machine_info
    from ..benchmark.run import run_all
    from ..benchmark.table import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    if args.json:
        from ..io.safety import check_outputs

        check_outputs(files=[args.json], inputs=[getattr(args, "config", None)])  # before the benchmark, not after
    parts = tuple(dict.fromkeys(args.only)) if args.only else PARTS
    config = BenchConfig.quick(parts=parts) if args.quick else BenchConfig(parts=parts)
    info = machine_info()

    def log(message: str) -> None:
        if not args.no_progress:
            print(f"crd-fast bench: {message}", file=sys.stderr, flush=True)

    log(describe_machine(info))
    results, extra = run_all(config, log)
    echo(format_table(results, info, extra))
    if args.json:
        from ..io.atomic import atomic_write

        timings = {k: {"best_s": t.best, "median_s": t.median, "times_s": t.times} for k, t in results.items()}
        payload = {"machine": info, "config": config.describe(), "timings": timings, "extra": extra}
        with atomic_write(os.fspath(args.json)) as tmp:
            tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        echo(f"crd-fast bench: wrote {args.json}")
    return 0
