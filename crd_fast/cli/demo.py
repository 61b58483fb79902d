"""``crd-fast demo``: real solar cells and generated parts, fitted and evaluated with ImageNet features; HTML report.

Needs no download: the backbone is EfficientNet-Lite0 with its packaged ImageNet weights (the detector's default),
the real images are the polycrystalline cells of the registry package ``elpv-dataset`` (crd_fast/data/elpv.py;
`crd-fast[demo]` installs it), and the generated categories come from crd_fast.synthetic. Each part is evaluated
with the detector's defaults beside PaDiM's rule and exact nearest-neighbour search on the same features. Without
the data package the demo says how to install it and runs the generated part.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..choices import WEIGHT_SOURCES
from .options import add_detector_options, command, echo, make_detector, positive_int, progress_enabled, warn

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from ..detector import CRDDetector

#: Sizes of the full demo and of --quick: the generated categories, and the real cells ("cells_*").
FULL = {
    "categories": ("fabric", "stone", "cap"),
    "n_train": 30,
    "n_test_good": 10,
    "n_test_defect": 12,
    "size": 256,
    "resize": 256,
    "crop": 224,
    "cells_train": 200,
    "cells_test": 60,
    "cells_px": 160,
}
QUICK = {
    "categories": ("fabric", "cap"),
    "n_train": 20,
    "n_test_good": 10,
    "n_test_defect": 12,
    "size": 128,
    "resize": 128,
    "crop": 128,
    "cells_train": 40,
    "cells_test": 20,
    "cells_px": 128,
}
#: The other scoring rules measured on the same features (crd_fast/evaluation/baselines.py).
BASELINES = ("nn", "padim")

EPILOG = """\
what it does:
  1. real parts: writes a seeded split of the polycrystalline solar cells of the elpv-dataset package to
     OUT/data/elpv_poly (200 defect-free cells to fit, 60 good and 60 defective to test; no pixel masks exist),
     fits the detector with its defaults (EfficientNet-Lite0, ImageNet weights; the scoring model and lam_rel
     chosen without labels) and measures it beside PaDiM's rule and exact nearest-neighbour search on the same
     features (image AUROC, ROC curves, the best and worst cells with their anomaly maps);
  2. generated parts: a periodic texture (fabric), a stochastic texture (stone) and an object (cap) with
     scratches, cracks, holes, stains and missing pieces and their exact masks (pixel metrics too), the same way;
  3. writes OUT/report.html and OUT/report.json.

Without elpv-dataset (pip install 'crd-fast[demo]') the demo says so and runs the generated part only.

examples:
  crd-fast demo                         about two minutes on a 2-core CPU
  crd-fast demo --quick                 fewer and smaller images: well under a minute
  crd-fast demo --no-real               the generated categories only
  crd-fast demo --out /tmp/demo --seed 3
"""


def register(sub: Any) -> None:
    with command(
        sub,
        "demo",
        epilog=EPILOG,
        run=run,
        help="run the built-in demo: real solar cells and generated parts, fit, evaluate, HTML report",
        description="Fit and evaluate the detector on real solar cells (the elpv-dataset package) and on generated "
        "parts, beside PaDiM's rule and nearest-neighbour search on the same features, and write an HTML + JSON "
        "report. Needs no download.",
    ) as p:
        p.add_argument(
            "--out",
            default="crd-fast-demo",
            metavar="DIR",
            help="output folder: data/, report.html, report.json (default: crd-fast-demo)",
        )
        p.add_argument("--quick", action="store_true", help="fewer and smaller images: well under a minute")
        p.add_argument(
            "--no-real", dest="real", action="store_false", help="skip the real solar cells (generated parts only)"
        )
        p.add_argument(
            "--categories",
            metavar="C1,C2",
            type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
            help="generated categories among fabric, stone, cap (default: all three; fabric,cap with --quick)",
        )
        p.add_argument(
            "--n-train",
            type=positive_int,
            metavar="N",
            help="good training images per generated category (default: 30; 20 with --quick)",
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
            "--no-compare",
            dest="compare",
            action="store_false",
            help="skip PaDiM's rule and nearest-neighbour search on the same features",
        )
        add_detector_options(
            p,
            resize=None,
            crop=None,
            size_note="generated parts 256 / 224 (128 / 128 with --quick); cells 160 px (128 with --quick)",
        )


@dataclass
class DemoRun:
    """What the demo did: where things are, the evaluations, the report, how long it took and what was skipped."""

    out: Path
    data_root: Path
    evals: list
    report: Any
    seconds: float
    detector: CRDDetector
    notes: list[str]


def _bar(args: argparse.Namespace, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not progress_enabled(args), dynamic_ncols=True)


def _real_part(args: argparse.Namespace, preset: dict, data_root: Path) -> tuple[list, Optional[Any], list[str]]:
    """The elpv poly cells, fitted and evaluated (or a note saying how to get them)."""
    from ..data import elpv
    from ..evaluation.mvtec import evaluate_mvtec

    if not args.real:
        return [], None, []
    if not elpv.available():
        return [], None, [f"real solar cells skipped: the elpv-dataset package is missing ({elpv.INSTALL_HINT})"]
    n_test = preset["cells_test"]
    total = preset["cells_train"] + 2 * n_test
    with _bar(args, total, "write cells") as bar:
        elpv.write_elpv_poly(
            data_root, preset["cells_train"], n_test, n_test, args.seed, lambda done, _: bar.update(done - bar.n)
        )
    px = preset["cells_px"]
    detector = make_detector(args, resize=args.resize or px, crop=args.crop or args.resize or px)
    evals = evaluate_mvtec(
        detector,
        data_root,
        [elpv.CATEGORY],
        baselines=BASELINES if args.compare else (),
        progress=progress_enabled(args),
    )
    note = (
        f"Real parts: {elpv.CATEGORY}, the polycrystalline solar cells of elpv-dataset (images CC BY-NC-SA 4.0): "
        f"{preset['cells_train']} defect-free cells to fit, {n_test} good and {n_test} defective to test (seed "
        f"{args.seed}), {detector.preprocess.crop} px; no pixel masks exist for them."
    )
    return evals, detector, [note]


def _categories(args: argparse.Namespace, preset: dict) -> tuple[str, ...]:
    """The generated categories asked for (ValueError naming any unknown one)."""
    from ..synthetic import CATEGORIES

    categories = args.categories or preset["categories"]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(
            f"unknown demo categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"choose from {', '.join(CATEGORIES)}"
        )
    return tuple(categories)


def _generated_part(args: argparse.Namespace, preset: dict, data_root: Path) -> tuple[list, Any, list[str]]:
    """The generated categories, fitted and evaluated."""
    from ..evaluation.mvtec import evaluate_mvtec
    from ..synthetic import generate_dataset

    categories = _categories(args, preset)
    size = args.size or preset["size"]
    resize = args.resize or min(preset["resize"], size)
    detector = make_detector(args, resize=resize, crop=args.crop or min(preset["crop"], resize))
    counts = {k: getattr(args, k) or preset[k] for k in ("n_train", "n_test_good", "n_test_defect")}
    with _bar(args, len(categories) * sum(counts.values()), "generate data") as bar:
        generate_dataset(
            data_root,
            categories=categories,
            size=size,
            seed=args.seed,
            progress=lambda done, _total: bar.update(done - bar.n),
            **counts,
        )
    evals = evaluate_mvtec(
        detector,
        data_root,
        list(categories),
        baselines=BASELINES if args.compare else (),
        progress=progress_enabled(args),
    )
    note = (
        f"Generated parts (crd_fast.synthetic, seed {args.seed}): {', '.join(categories)}; {counts['n_train']} "
        f"training, {counts['n_test_good']} good and {counts['n_test_defect']} defective test images per category, "
        f"{size} px, with exact defect masks."
    )
    return evals, detector, [note]


def _check_outputs(args: argparse.Namespace, categories: tuple[str, ...], out: Path, data_root: Path) -> None:
    """Before any work: the data folders and the report may replace nothing the demo reads (crd_fast.io.safety),
    and existing data folders must be the generators' own."""
    from ..data import elpv
    from ..io.safety import check_outputs
    from ..synthetic.dataset import check_generated_folders
    from .evaluate import report_files

    folders = [data_root / c for c in categories] + ([data_root / elpv.CATEGORY] if args.real else [])
    weights = [args.weights] if args.weights not in WEIGHT_SOURCES else []
    check_outputs(files=report_files(str(out)), folders=folders, inputs=[*weights, getattr(args, "config", None)])
    check_generated_folders(data_root, categories)


def run_demo(args: argparse.Namespace) -> DemoRun:
    """Real cells, generated parts, report (the library side of the command; ``args`` as parsed)."""
    from .evaluate import run_report

    preset = QUICK if args.quick else FULL
    out = Path(args.out)
    data_root = out / "data"
    started = time.perf_counter()
    # bad options, unknown categories and unsafe outputs fail before anything is written
    _check_outputs(args, _categories(args, preset), out, data_root)
    make_detector(args, resize=args.resize or 64, crop=args.crop or 64)
    real_evals, real_detector, real_notes = _real_part(args, preset, data_root)
    gen_evals, detector, gen_notes = _generated_part(args, preset, data_root)
    notes = real_notes + gen_notes
    if args.compare:
        notes.append(
            "Beside the detector: PaDiM's rule (a Gaussian per patch position) and exact nearest-neighbour search "
            "(PatchCore's rule without a coreset) on the same features; their ROC curves are drawn beside CRD's."
        )
    evals = real_evals + gen_evals
    report = run_report(str(out), evals, detector, args.argv, "crd-fast demo report", notes)
    return DemoRun(out, data_root, evals, report, time.perf_counter() - started, real_detector or detector, notes)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.mvtec import format_table

    echo(f"crd-fast demo: data in {Path(args.out) / 'data'} (seed {args.seed}{', quick' if args.quick else ''})")
    if args.weights == "random":
        echo("  NOTE: the backbone uses seeded RANDOM weights, as asked. The numbers below show that the pipeline")
        echo("        works end to end; they are NOT the detector's accuracy with learned weights.")
    demo = run_demo(args)
    echo(f"  backbone: {demo.detector.weights_description}")
    for note in demo.notes:
        if note.startswith("real solar cells skipped"):
            warn(note)
    echo("")
    echo(format_table(demo.evals))
    echo("")
    echo(f"finished in {demo.seconds:.1f} s")
    echo(f"report: {demo.report.html_path}   (figures as JSON: {demo.report.json_path})")
    if demo.detector.uses_random_weights:
        warn("RANDOM backbone weights: demo numbers, not real accuracy")
    return 0
