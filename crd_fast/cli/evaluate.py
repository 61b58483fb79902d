"""``crd-fast eval``: fit and evaluate per category on an MVTec AD-layout data set; optional HTML + JSON report."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..choices import WEIGHT_SOURCES
from .options import CLIError, add_detector_options, command, echo, fraction, make_detector, progress_enabled, warn

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from ..detector import CRDDetector

EPILOG = """\
ROOT layout (MVTec AD):
  ROOT/<category>/train/good/*.png                  defect-free training images
  ROOT/<category>/test/good/*.png                   defect-free test images
  ROOT/<category>/test/<defect type>/*.png          defective test images
  ROOT/<category>/ground_truth/<defect type>/<name>_mask.png   masks (optional: pixel metrics need them)

columns: image AUROC (ranking of images), pixel AUROC and AUPRO (localisation, AUPRO up to 30% false
positive rate), F1-max (best F1 over thresholds), fit s (fitting time), ms/img (prediction time per image,
reading the file included). --compare-nn adds exact nearest-neighbour search (PatchCore's rule, no
coreset) on the same features and maps, and the time of each head alone.

examples:
  crd-fast eval mvtec_ad/                                  every category found
  crd-fast eval mvtec_ad/ --category bottle --category cable --report report/
  crd-fast eval mvtec_ad/bottle --compare-nn               one category folder
  crd-fast eval data/ --backbone resnet18 --weights random (no weights file: not real accuracy)
"""


def register(sub: Any) -> None:
    with command(
        sub,
        "eval",
        epilog=EPILOG,
        run=run,
        help="fit and evaluate per category on an MVTec AD-layout data set",
        description="For each category: fit on train/good, score test/, and print image AUROC, pixel AUROC, "
        "AUPRO, F1-max and timings; optionally write an HTML + JSON report.",
    ) as p:
        p.add_argument("root", metavar="ROOT", help="data set root (or one category folder)")
        p.add_argument(
            "-c",
            "--category",
            action="append",
            metavar="C",
            help="category to evaluate (repeatable; default: every category under ROOT)",
        )
        p.add_argument(
            "--compare-nn",
            action="store_true",
            help="also score with exact nearest-neighbour search on the same features, side by side",
        )
        p.add_argument(
            "--compare-padim",
            action="store_true",
            help="also score with PaDiM's rule (a Gaussian per patch position) on the same features, side by side",
        )
        p.add_argument(
            "--nn-subsample",
            type=fraction,
            default=None,
            metavar="F",
            help="keep this fraction of training patches in the NN memory bank (default: all)",
        )
        p.add_argument("--report", metavar="DIR", help="write DIR/report.html and DIR/report.json")
        add_detector_options(p)


def resolve_root(root: str, categories: Optional[Sequence[str]]) -> tuple[Path, list[str]]:
    """(data set root, categories): ROOT may also be one category folder (it has train/ and test/)."""
    from ..data import MVTecAD

    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"data set folder {root!r} does not exist")
    if (path / "train").is_dir() and (path / "test").is_dir():
        if categories and list(categories) != [path.name]:
            raise CLIError(f"{root!r} is a single category folder ({path.name}); --category does not apply")
        return path.parent, [path.name]
    found = MVTecAD.categories(path)
    if not found:
        raise CLIError(f"no categories under {root!r} (expected ROOT/<category>/train/good and ROOT/<category>/test/)")
    if categories:
        missing = [c for c in categories if c not in found]
        if missing:
            raise CLIError(f"category {', '.join(missing)} not found under {root!r} (found: {', '.join(found)})")
        return path, list(dict.fromkeys(categories))
    return path, found


def check_names(root: Path, categories: Sequence[str]) -> None:
    """Refuse (naming it) a data set file whose name is not UTF-8: it could not be written to the report."""
    from ..data import MVTecAD
    from ..io.safety import check_image_names

    for category in categories:
        for split in ("train", "test"):
            if (root / category / split).is_dir():
                check_image_names([s.image_path for s in MVTecAD(root, category, split).samples], "data set file")


def report_files(out_dir: str) -> list[str]:
    """The files ``--report DIR`` writes."""
    return [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.html")]


def run_report(
    out_dir: str,
    evals: Sequence[Any],
    detector: CRDDetector,
    argv: Sequence[str],
    title: str,
    notes: Sequence[str] = (),
) -> Any:
    """write_report for evaluated categories, with the detector's settings and weights in the header."""
    from ..report import RunInfo, write_report

    info = RunInfo(
        settings=dict(detector.config),
        weights=detector.weights_description,
        random_weights=detector.uses_random_weights,
        title=title,
        command="crd-fast " + " ".join(shlex.quote(a) for a in argv),
        notes=list(notes),
    )
    return write_report(out_dir, [e.result for e in evals], info)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.mvtec import evaluate_mvtec, format_table

    root, categories = resolve_root(args.root, args.category)
    check_names(root, categories)  # before any work: names go into the UTF-8 report
    if args.report:
        from ..io.safety import check_outputs

        weights = [args.weights] if args.weights not in WEIGHT_SOURCES else []
        # before the evaluation, not after it (crd_fast.io.safety)
        check_outputs(files=report_files(args.report), inputs=[args.root, *weights, args.config])
    detector = make_detector(args)
    echo(
        f"crd-fast eval: {len(categories)} categor{'y' if len(categories) == 1 else 'ies'} under {root}: "
        f"{', '.join(categories)}"
    )
    echo(f"  backbone: {detector.weights_description}")
    evals = evaluate_mvtec(
        detector,
        root,
        categories,
        compare_nn_baseline=args.compare_nn,
        baselines=("padim",) if args.compare_padim else (),
        nn_subsample=args.nn_subsample,
        progress=progress_enabled(args),
    )
    echo("")
    echo(format_table(evals))
    for e in evals:
        for note in e.notes:
            echo(f"  {e.name}: {note}")
    if args.report:
        report = run_report(args.report, evals, detector, args.argv, "crd-fast evaluation report")
        echo(f"wrote {report.html_path} and {report.json_path}")
    if detector.uses_random_weights:
        warn("the backbone has RANDOM weights: these numbers are not the detector's real accuracy")
    return 0
