"""``crd-fast demo``: generate a synthetic MVTec-layout data set, fit, evaluate, write the HTML + JSON report.

Needs no data, no weights and no network. The backbone defaults to resnet18 with seeded random weights:
on this project's 2-core CPU it runs the full demo about 5x faster than wide_resnet50_2 (57 s against 269 s)
and, with random weights, separates the synthetic defects at least as well (see ``BACKBONE_NOTE``).
Random weights mean the numbers show that the pipeline works end to end, not the product's accuracy.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..choices import WEIGHT_SOURCES
from .options import add_detector_options, command, echo, make_detector, positive_int, progress_enabled, warn

DEMO_BACKBONE = "resnet18"
#: Data set and image sizes of the full demo and of --quick.
FULL = {
    "categories": ("fabric", "stone", "cap"),
    "n_train": 30,
    "n_test_good": 10,
    "n_test_defect": 12,
    "size": 256,
    "resize": 256,
    "crop": 224,
}
QUICK = {
    "categories": ("fabric", "cap"),
    "n_train": 20,
    "n_test_good": 10,
    "n_test_defect": 12,
    "size": 128,
    "resize": 128,
    "crop": 128,
}
BACKBONE_NOTE = (
    "Backbone resnet18 was chosen for the demo by measurement on a 2-core CPU: with seeded random "
    "weights the full demo took 57 s with it against 269 s with wide_resnet50_2, and it separated the "
    "synthetic defects at least as well (mean image AUROC 1.000 against 0.986)."
)

EPILOG = """\
what it does:
  1. writes a synthetic data set in the MVTec AD layout to OUT/data (deterministic by --seed): a periodic
     texture (fabric), a stochastic texture (stone) and an object (cap), with scratches, cracks, holes,
     stains and missing pieces, and their exact masks;
  2. fits one detector per category on the good training images;
  3. scores the test images, compares with exact nearest-neighbour search on the same features,
     and writes OUT/report.html (metrics, ROC curves, heatmaps) and OUT/report.json.

The backbone has seeded RANDOM weights (no download needed): the numbers show that the pipeline works,
not the accuracy of real (ImageNet) weights. With the weights file at hand, try --weights PATH.

examples:
  crd-fast demo                         about a minute on a 2-core CPU
  crd-fast demo --quick                 smaller images and two categories: a few seconds
  crd-fast demo --out /tmp/demo --seed 3
"""


def register(sub: Any) -> None:
    with command(
        sub,
        "demo",
        epilog=EPILOG,
        run=run,
        help="run the built-in demo: synthetic data, fit, evaluate, HTML report (no data needed)",
        description="Generate a small synthetic inspection data set, fit and evaluate the detector on it and "
        "write an HTML + JSON report. Needs no data, no weights and no network.",
    ) as p:
        p.add_argument(
            "--out",
            default="crd-fast-demo",
            metavar="DIR",
            help="output folder: data/, report.html, report.json (default: crd-fast-demo)",
        )
        p.add_argument(
            "--quick", action="store_true", help="smaller images (128 px), fewer images, two categories: a few seconds"
        )
        p.add_argument(
            "--categories",
            metavar="C1,C2",
            type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
            help="synthetic categories among fabric, stone, cap (default: all three; fabric,cap with --quick)",
        )
        p.add_argument(
            "--n-train",
            type=positive_int,
            metavar="N",
            help="good training images per category (default: 30; 20 with --quick)",
        )
        p.add_argument(
            "--n-test-good", type=positive_int, metavar="N", help="good test images per category (default: 10)"
        )
        p.add_argument(
            "--n-test-defect", type=positive_int, metavar="N", help="defective test images per category (default: 12)"
        )
        p.add_argument(
            "--size", type=positive_int, metavar="PX", help="generated image size (default: 256; 128 with --quick)"
        )
        p.add_argument(
            "--no-compare-nn", dest="compare_nn", action="store_false", help="skip the nearest-neighbour comparison"
        )
        add_detector_options(
            p,
            backbone=DEMO_BACKBONE,
            weights="random",
            resize=None,
            crop=None,
            size_note="256 / 224, or 128 / 128 with --quick",
        )


@dataclass
class DemoRun:
    """What the demo did: where things are, the per-category evaluations and how long it took."""

    out: Path
    data_root: Path
    evals: list
    report: Any
    seconds: float
    detector: Any


def run_demo(args: argparse.Namespace) -> DemoRun:
    """Generate, fit, evaluate, report (the library side of the command; ``args`` as parsed)."""
    from tqdm.auto import tqdm

    from ..evaluation.mvtec import evaluate_mvtec
    from ..io.safety import check_outputs
    from ..synthetic import CATEGORIES, generate_dataset
    from ..synthetic.dataset import check_generated_folders
    from .evaluate import report_files, run_report

    preset = QUICK if args.quick else FULL
    categories = args.categories or preset["categories"]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(
            f"unknown demo categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"choose from {', '.join(CATEGORIES)}"
        )
    size = args.size or preset["size"]
    args.resize = args.resize or min(preset["resize"], size)
    args.crop = args.crop or min(preset["crop"], args.resize)
    counts = {k: getattr(args, k) or preset[k] for k in ("n_train", "n_test_good", "n_test_defect")}
    out = Path(args.out)
    data_root = out / "data"
    t_start = time.perf_counter()
    weights = [args.weights] if args.weights not in WEIGHT_SOURCES else []
    # before any work: the generated categories and the report may replace nothing the demo reads
    check_outputs(
        files=report_files(str(out)),
        folders=[data_root / c for c in categories],
        inputs=[*weights, getattr(args, "config", None)],
    )
    check_generated_folders(data_root, categories)  # existing category folders must be the generator's own
    detector = make_detector(args)  # built first: a bad option fails before any image is written
    total = len(categories) * sum(counts.values())
    with tqdm(
        total=total, desc="generate data", unit="img", disable=not progress_enabled(args), dynamic_ncols=True
    ) as bar:
        generate_dataset(
            data_root,
            categories=categories,
            size=size,
            seed=args.seed,
            progress=lambda done, _total: bar.update(done - bar.n),
            **counts,
        )
    evals = evaluate_mvtec(
        detector, data_root, list(categories), compare_nn_baseline=args.compare_nn, progress=progress_enabled(args)
    )
    notes = [
        f"Synthetic data (crd_fast.synthetic, seed {args.seed}): {', '.join(categories)}; "
        f"{counts['n_train']} training, {counts['n_test_good']} good and {counts['n_test_defect']} defective "
        f"test images per category, {size} px."
    ]
    if args.backbone == DEMO_BACKBONE:
        notes.append(BACKBONE_NOTE)
    report = run_report(str(out), evals, detector, args.argv, "crd-fast demo report", notes)
    return DemoRun(out, data_root, evals, report, time.perf_counter() - t_start, detector)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.mvtec import format_table

    echo(
        f"crd-fast demo: synthetic data set in {Path(args.out) / 'data'} (seed {args.seed}"
        f"{', quick' if args.quick else ''})"
    )
    if args.weights == "random":
        echo("  NOTE: the backbone uses seeded RANDOM weights (nothing is downloaded). The numbers below show that")
        echo("        the pipeline works end to end; they are NOT the detector's accuracy with real ImageNet weights.")
    demo = run_demo(args)
    echo(f"  backbone: {demo.detector.weights_description}")
    echo("")
    echo(format_table(demo.evals))
    echo("")
    echo(f"finished in {demo.seconds:.1f} s")
    echo(f"report: {demo.report.html_path}   (figures as JSON: {demo.report.json_path})")
    if demo.detector.uses_random_weights:
        warn("RANDOM backbone weights: demo numbers, not real accuracy")
    return 0
