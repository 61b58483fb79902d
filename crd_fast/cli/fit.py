"""``crd-fast fit``: fit a detector on defect-free images and write one model file."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..choices import WEIGHT_SOURCES
from ..detector.config import RUNTIME_OPTIONS
from ..selection.record import SelectionRecord, selection_table
from .options import (
    CLIError,
    add_detector_options,
    command,
    detector_kwargs,
    echo,
    finite_float,
    make_detector,
    probability,
    progress_enabled,
    warn,
)

EPILOG = """\
examples:
  crd-fast fit bottle/train/good -o bottle.crd
  crd-fast fit mvtec_ad/bottle -o bottle.crd                (an MVTec AD category: uses its train/good)
  crd-fast fit good/ -o model.crd --backbone resnet18 --weights /models/resnet18.pth
  crd-fast fit good/ -o model.crd --calibrate held_out_good/ (threshold = 99% quantile of their scores)
  crd-fast fit new_good/ -o model.crd --update              (add images to an existing model)

distributed fitting (torch.distributed; each process reads its share of the images, the d x d sums
are added with one all_reduce, rank 0 writes the file):
  torchrun --nproc-per-node 2 -m crd_fast fit good/ -o model.crd --distributed
  on several machines (same command on each, NODE = 0, 1, ...):
  torchrun --nnodes 2 --node-rank NODE --nproc-per-node 4 --master-addr HOST --master-port 29500 \\
      -m crd_fast fit /shared/good -o /shared/model.crd --distributed --device cuda
  gloo is used on CPU, nccl on GPU. Without torchrun, --distributed runs as a single process.
"""


def register(sub: Any) -> None:
    with command(
        sub,
        "fit",
        epilog=EPILOG,
        run=run,
        help="fit a detector on defect-free images and write a model file",
        description="Fit a CRD detector on defect-free (good) images and write everything needed to "
        "predict into one model file. Only d x d sums are kept, so memory does not grow with "
        "the number of images.",
    ) as p:
        p.add_argument(
            "data",
            metavar="DATA",
            help="a folder of good images, or an MVTec AD category folder (its train/good is used)",
        )
        p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (e.g. model.crd)")
        p.add_argument(
            "--update",
            action="store_true",
            help="add DATA to the existing model MODEL instead of starting afresh (its detector options are "
            "kept: an option that would change them is refused; --device, --batch-size and --precision apply; a "
            "symbolic link MODEL updates the file it points to)",
        )
        thr = p.add_mutually_exclusive_group()
        thr.add_argument(
            "--calibrate",
            metavar="DIR",
            help="held-out good images: the threshold becomes the --quantile of their scores",
        )
        thr.add_argument("--threshold", type=finite_float, metavar="T", help="store this image-score threshold")
        p.add_argument(
            "--quantile",
            type=probability,
            default=0.99,
            metavar="Q",
            help="quantile for --calibrate (default: 0.99, about 1%% of good images flagged)",
        )
        p.add_argument(
            "--distributed",
            action="store_true",
            help="fit with torch.distributed across the processes torchrun started (see below)",
        )
        add_detector_options(p)


def training_images(data: str) -> tuple[list[str], Path]:
    """The image files to fit on: DATA's images, or DATA/train/good for an MVTec AD category folder."""
    from ..data import MVTecAD, list_image_files
    from ..features import IMAGE_EXTENSIONS

    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"training data {data!r} does not exist")
    if root.is_file():
        return [str(root)], root.parent
    folder = root / "train" / "good" if (root / "train" / "good").is_dir() else root
    files = list_image_files(folder)
    if files:
        return files, folder
    categories = MVTecAD.categories(root)
    if categories:
        raise CLIError(
            f"{data!r} looks like an MVTec AD root (categories: {', '.join(categories)}); "
            f"pass one category folder, e.g. {root / categories[0]}"
        )
    raise CLIError(f"no image files in {str(folder)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _update_options(args: argparse.Namespace) -> dict[str, Any]:
    """What ``CRDDetector.load`` is asked for on --update: the run-time options, and every detector option the user
    gave (typed or in the config file), which must then describe the stored model (``load`` compares them)."""
    runtime: dict[str, Any] = {"batch_size": args.batch_size}
    if args.precision is not None:
        runtime["precision"] = args.precision
    given = getattr(args, "given", frozenset())
    defining = {k: v for k, v in detector_kwargs(args).items() if k in given and k not in RUNTIME_OPTIONS}
    return {**defining, **runtime}


def _load_for_update(args: argparse.Namespace, device: Any) -> Any:
    from ..detector.detector import CRDDetector
    from ..detector.persistence import OptionMismatchError

    try:
        return CRDDetector.load(args.output, device=device, **_update_options(args))
    except OptionMismatchError as exc:
        raise CLIError(
            f"--update adds images to the model as it was defined: {exc}; drop that option (with --update only "
            "--device, --batch-size and --precision may differ from the model's own)"
        ) from exc


def _fit(args: argparse.Namespace, files: list[str]) -> Any:
    progress = progress_enabled(args)
    if args.update and not os.path.isfile(args.output):
        raise FileNotFoundError(f"--update: model file {args.output!r} does not exist (fit without --update first)")
    if not args.distributed:
        if args.update:
            return _load_for_update(args, args.device).partial_fit(files, progress=progress)
        return make_detector(args).fit(files, progress=progress)

    from ..distributed import launched_by_torchrun, run_fit

    if not launched_by_torchrun():
        warn("--distributed without torchrun: fitting in this single process (see 'crd-fast fit --help')")
    device = None if args.device == "auto" else args.device

    def build(env: Any) -> Any:
        dev = str(env.device) if env.device.type == "cuda" else args.device
        if args.update:
            return _load_for_update(args, dev)
        return make_detector(args, device=dev)

    return run_fit(build, files, args.output, update=args.update, device=device, progress=progress)


def run(args: argparse.Namespace) -> int:
    from ..data import list_image_files
    from ..io.locking import model_update
    from ..io.outputs import check_readable_file
    from ..io.safety import check_outputs

    files, folder = training_images(args.data)
    calibration: list[str] = []
    if args.calibrate is not None:
        if not Path(args.calibrate).is_dir():
            raise FileNotFoundError(f"--calibrate folder {args.calibrate!r} does not exist")
        calibration = list_image_files(args.calibrate)
    if args.update:
        check_readable_file(args.output, "--update: model file")
    weights = [args.weights] if args.weights not in WEIGHT_SOURCES else []
    # before the fit, not after it: the model may overwrite none of what the fit reads (crd_fast.io.safety)
    model = [args.output] if args.update else []  # --update reads the model and writes it back: nothing else
    check_outputs(
        files=[args.output],
        inputs=[args.data, folder, *files, args.calibrate, *calibration, *weights, args.config, *model],
        updates=model,
    )
    main = _rank() == 0
    if main:
        echo(f"crd-fast fit: {len(files)} training images from {folder}")
    # An update is a read-modify-write: hold the file so a concurrent writer fails instead of losing an update.
    with model_update(args.output) if args.update and main else contextlib.nullcontext():
        return _run(args, files, main)


def _run(args: argparse.Namespace, files: list[str], main: bool) -> int:
    t0 = time.perf_counter()
    det = _fit(args, files)
    seconds = time.perf_counter() - t0
    if not main:  # rank 0 wrote the file and reports; the other ranks are done
        return 0
    threshold_note = "none (predict gives scores only; set one with --calibrate or --threshold)"
    if args.calibrate is not None:
        value = det.calibrate(args.calibrate, q=args.quantile, progress=progress_enabled(args))
        threshold_note = f"{value:.6g} (quantile {args.quantile:g} of the scores of {args.calibrate})"
    elif args.threshold is not None:
        det.set_threshold(args.threshold)
        threshold_note = f"{args.threshold:.6g} (given)"
    elif det.threshold is not None:
        threshold_note = f"{det.threshold:.6g} (kept from the model file)"
    if not args.distributed or args.calibrate is not None or args.threshold is not None:
        det.save(args.output)  # a distributed fit has already written it (rank 0), unless a threshold was added
    _summary(det, args.output, seconds, threshold_note)
    return 0


def _summary(det: Any, path: str, seconds: float, threshold_note: str) -> None:
    stats: Optional[dict] = det.train_score_stats
    echo(f"  backbone:   {det.weights_description}")
    echo(
        f"  features:   layers {','.join(det.layers)}, embedding {det.embedding}, d = {det.dim}, "
        f"patch grid {det.patch_grid[0]}x{det.patch_grid[1]}"
    )
    echo(
        f"  fitted:     {det.n_images} images, {det.model.n_patches} patches, spatial {det.spatial_choice}, "
        f"lam_rel = {'-' if det.lam_rel is None else format(det.lam_rel, 'g')}, in {seconds:.1f} s"
    )
    _selection_summary(det.selection)
    if stats:
        echo(f"  training image scores: mean {stats['mean']:.4g}, max {stats['max']:.4g} (from {stats['n']} images)")
    echo(f"  threshold:  {threshold_note}")
    echo(f"wrote {path} ({os.path.getsize(path) / 2**20:.2f} MiB)")
    if det.uses_random_weights:
        warn("the backbone has RANDOM weights: fine for trying things out, not for real inspection")


def _selection_summary(record: Optional[SelectionRecord]) -> None:
    """What the label-free choice (lam_rel and/or spatial "auto") chose, with its validation curve."""
    if record is None:
        return
    lam = "-" if record.lam_rel is None else format(record.lam_rel, "g")
    asked = ", ".join(f"{k} {v}" for k, v in record.asked.items())
    echo(f"  selection:  spatial {record.spatial}, lam_rel {lam} (asked: {asked})")
    if not record.made:
        echo(f"              {record.reason()}")
        return
    fit_seconds = record.fit_seconds or 0.0
    share = f", {100 * record.seconds / fit_seconds:.0f}% of the fit" if fit_seconds > 0 else ""
    echo(
        f"              {record.held_out} of {record.n_images} images held out with pseudo-defects; "
        f"{record.seconds:.1f} s{share}"
    )
    echo(f"              {record.criterion or 'criterion'} (* = chosen):")
    for line in selection_table(record):
        echo("          " + line)
