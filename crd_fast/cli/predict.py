"""``crd-fast predict``: score images with a model file; write scores (CSV + JSON) and heatmap overlays."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .options import CLIError, add_runtime_options, command, echo, finite_float, progress_enabled, warn, weights_spec

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from ..detector import CRDDetector

EPILOG = """\
outputs in OUT/ (a new or empty folder, or --overwrite; written to a staging folder and moved into OUT when the
whole run succeeded, so a failed run leaves OUT as it was; OUT may not overlap the input images):
  scores.csv, scores.json   one row per image, in input order: index, path, image_score, and when the model
                            has a threshold normalized_score (0..1, 0.5 at the threshold) and label
                            (True = defective, i.e. image_score >= threshold); heatmap = the overlay file
  heatmaps/NAME.png         the image as the model saw it (resized, cropped) with its anomaly map on top;
                            colours: blue = normal, green = at the threshold (or, without one, at the highest
                            score of the training images), red = beyond

examples:
  crd-fast predict model.crd new_images/ -o results/
  crd-fast predict model.crd a.png b.png -o results/ --no-images
  crd-fast predict model.crd mvtec_ad/bottle/test -r -o results/ --threshold 2.5

sharded prediction (each process scores its share; rank 0 writes the tables in input order):
  torchrun --nproc-per-node 2 -m crd_fast predict model.crd images/ -o results/ --distributed
"""

#: Images scored per call of ``predict`` in a single process: bounds memory (maps are 4 bytes per pixel).
CHUNK = 64


def register(sub: Any) -> None:
    with command(
        sub,
        "predict",
        epilog=EPILOG,
        run=run,
        help="score images with a model; write scores and heatmaps",
        description="Score images with a model file written by 'crd-fast fit': one anomaly score per image "
        "(the largest patch score) and an anomaly map showing where.",
    ) as p:
        p.add_argument("model", metavar="MODEL", help="model file from 'crd-fast fit'")
        p.add_argument("images", metavar="IMAGES", nargs="+", help="image files and/or folders of images")
        p.add_argument(
            "-o", "--output", required=True, metavar="OUT", help="folder for scores.csv, scores.json, heatmaps/"
        )
        p.add_argument(
            "-r", "--recursive", action="store_true", help="also take images from subfolders of IMAGES folders"
        )
        p.add_argument("--no-images", action="store_true", help="write the scores only, no heatmap PNGs")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="OUT may hold earlier results: replace them (scores and heatmaps, as a set, at the end)",
        )
        p.add_argument(
            "--threshold", type=finite_float, metavar="T", help="image-score threshold to use instead of the model's"
        )
        p.add_argument(
            "--weights",
            type=weights_spec,
            metavar="PATH",
            help="where the backbone weights file is now, if it moved since fitting (checked by SHA-256)",
        )
        p.add_argument(
            "--distributed", action="store_true", help="shard the images over the processes torchrun started"
        )
        g = p.add_argument_group("run-time options (default: as stored in the model)")
        add_runtime_options(g, batch_size=None)


def collect_images(inputs: Sequence[str], recursive: bool = False) -> list[str]:
    """The image files named by ``inputs`` (files, or folders: their images sorted by name), in order."""
    from ..data import list_image_files

    files: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_image_files(p, recursive=recursive)
            if not found:
                raise CLIError(f"no image files in folder {item!r}" + ("" if recursive else " (use -r for subfolders)"))
            files += found
        elif p.is_file():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"{item!r} is neither an image file nor a folder")
    return files


def heatmap_names(paths: Sequence[str]) -> list[str]:
    """Unique, readable PNG names for ``paths``: the file stems; when stems repeat, every name gets its
    parent folder (``good_000.png``, ``hole_000.png``); when that still repeats, the input index too."""
    from ..io.outputs import short_file_name

    return [short_file_name(n, i) for i, n in enumerate(_heatmap_names(paths))]  # each within NAME_MAX bytes


def _heatmap_names(paths: Sequence[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return [f"{s}.png" for s in stems]
    named = [f"{Path(p).parent.name}_{s}" for p, s in zip(paths, stems)]
    if len(set(named)) == len(named):
        return [f"{n}.png" for n in named]
    return [f"{i:05d}_{n}.png" for i, n in enumerate(named)]


def overlay_range(detector: CRDDetector) -> Optional[tuple[float, float]]:
    """Anomaly-map values mapped to the ends of the colour scale, fixed per model so colours compare
    across images and runs: the threshold (or the largest training image score) sits in the middle,
    and the spread of the training image scores sets the width (as ``thresholds.normalize_scores``)."""
    stats = detector.train_score_stats
    centre = detector.threshold if detector.threshold is not None else (stats or {}).get("max")
    if centre is None:
        return None
    span = float(stats["max"] - stats["min"]) if stats else 0.0
    if not span > 0:
        span = abs(float(centre)) or 1.0
    return float(centre) - span / 2, float(centre) + span / 2


def save_overlays(
    detector: CRDDetector,
    paths: Sequence[str],
    maps: Any,
    names: Sequence[str],
    folder: Path,
    value_range: Optional[tuple[float, float]],
) -> None:
    """One overlay PNG per image: ``preprocess.display(image)`` (the crop the map is aligned with) + map."""
    from ..features import load_image
    from ..report.overlay import heatmap_overlay, save_png

    vmin, vmax = value_range if value_range is not None else (None, None)
    for path, amap, name in zip(paths, maps, names):
        shown = detector.preprocess.display(load_image(path))
        save_png(folder / name, heatmap_overlay(shown, amap, vmin=vmin, vmax=vmax))


def _records(result: Any, indices: Sequence[int], paths: Sequence[str]) -> list[dict]:
    records = []
    for k, index in enumerate(indices):
        rec: dict[str, Any] = {"index": int(index), "path": paths[k], "image_score": float(result.image_scores[k])}
        if result.normalized_scores is not None:
            rec["normalized_score"] = float(result.normalized_scores[k])
        if result.labels is not None:
            rec["label"] = bool(result.labels[k])
        records.append(rec)
    return records


def _predict_local(
    detector: CRDDetector,
    files: list[str],
    heat_dir: Optional[Path],
    names: list[str],
    value_range: Optional[tuple[float, float]],
    progress: bool,
) -> list[dict]:
    """Predict in chunks so memory stays bounded, writing overlays as each chunk is done."""
    from tqdm.auto import tqdm

    from ..report.overlay import heatmap_overlay, save_png

    records: list[dict] = []
    vmin, vmax = value_range if value_range is not None else (None, None)
    with tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            result, shown = _predict_decoding_once(detector, chunk)
            records += _records(result, range(start, start + len(chunk)), chunk)
            if heat_dir is not None:
                for picture, amap, name in zip(shown, result.anomaly_maps, names[start : start + len(chunk)]):
                    save_png(heat_dir / name, heatmap_overlay(picture, amap, vmin=vmin, vmax=vmax))
            bar.update(len(chunk))
    return records


def _decode(detector: CRDDetector, path: str) -> tuple[Any, Any]:
    """One decode of ``path`` -> (the model input, the picture for the overlay): both come from the same
    resized crop, so they equal ``preprocess(image)`` and ``preprocess.display(image)``."""
    import numpy as np

    from ..features.preprocess import to_unit_tensor
    from ..io.images import decode_reservation, load_image

    pre = detector.preprocess
    with decode_reservation(path):  # parallel decoding bounded by memory (crd_fast.io.limits)
        crop = pre.geometric(to_unit_tensor(load_image(path)))
    shown = (crop.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return pre.normalize(crop), shown


def _predict_decoding_once(detector: CRDDetector, paths: list[str]) -> tuple[Any, list]:
    """``detector.predict(paths)`` and the overlay pictures, decoding every image once (not once for the
    scores and again for the heatmap)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from ..postprocess.results import DetectionResult

    workers = max(1, min(detector.batch_size, os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda p: _decode(detector, p), paths))
    model = detector.inference_model()
    scores, amaps, pmaps = [], [], []
    for start in range(0, len(paths), detector.batch_size):
        x = torch.stack([d[0] for d in decoded[start : start + detector.batch_size]]).to(detector.device)
        with torch.inference_mode():
            s, a, p = model(x)
        scores.append(s.double().cpu().numpy())
        amaps.append(a.float().cpu().numpy())
        pmaps.append(p.float().cpu().numpy())
    result = DetectionResult.from_batches(scores, amaps, pmaps, list(paths))
    return result.apply_threshold(detector.threshold, detector.train_score_stats), [d[1] for d in decoded]


def _open_shared_stage(results: Any, env: Any) -> None:
    """Rank 0 creates the run's own, uniquely named staging folder; the other ranks join it by path (a killed
    earlier run's staging folder is never reused)."""
    from ..distributed import DistributedError, all_gather_objects

    path: Optional[str] = None
    error: Optional[BaseException] = None
    if env.is_main:
        try:
            path = os.fspath(results.open().stage)
        except Exception as exc:  # reported to every rank, so none waits
            error = exc
    paths = all_gather_objects(path)
    if paths[0] is None:
        raise error or DistributedError("rank 0 could not create the staging folder of the results")
    if not env.is_main:
        results.open(attach=paths[0])


def _predict_distributed(
    args: argparse.Namespace, files: list[str], results: Any, names: list[str]
) -> tuple[list[dict], Any]:
    from ..distributed import launched_by_torchrun, run_predict

    if not launched_by_torchrun():
        warn("--distributed without torchrun: predicting in this single process (see 'crd-fast predict --help')")
    device = None if args.device in (None, "auto") else args.device
    loaded: dict[str, Any] = {}

    def build(env: Any) -> Any:
        _open_shared_stage(results, env)
        loaded["heat"] = None if args.no_images else results.stage / "heatmaps"
        if loaded["heat"] is not None:
            loaded["heat"].mkdir(exist_ok=True)
        dev = str(env.device) if env.device.type == "cuda" else args.device
        loaded["det"] = _load(args, dev)
        return loaded["det"]

    def on_result(indices: list[int], result: Any) -> None:  # on each rank, for its own shard
        if loaded["heat"] is not None:
            det = loaded["det"]
            save_overlays(
                det,
                [files[i] for i in indices],
                result.anomaly_maps,
                [names[i] for i in indices],
                loaded["heat"],
                overlay_range(det),
            )

    records = run_predict(build, files, on_result=on_result, device=device, progress=progress_enabled(args))
    return records, loaded["det"]


def _load(args: argparse.Namespace, device: Optional[str]) -> Any:
    from ..detector.detector import CRDDetector

    expected: dict[str, Any] = {}
    if args.batch_size is not None:
        expected["batch_size"] = args.batch_size
    if args.precision is not None:
        expected["precision"] = args.precision
    if args.weights is not None:
        expected["weights"] = args.weights
    det = CRDDetector.load(args.model, device=device, **expected)
    if args.threshold is not None:
        det.set_threshold(args.threshold)
    return det


def write_scores(out: Path, records: list[dict], detector: CRDDetector, model_path: str) -> tuple[Path, Path]:
    """scores.csv (via crd_fast.distributed.write_records) and scores.json (records + model summary)."""
    from ..distributed import write_records
    from ..io.atomic import atomic_write

    csv_path, json_path = out / "scores.csv", out / "scores.json"
    write_records(records, csv_path)
    doc = {
        "model": os.fspath(model_path),
        "weights": detector.weights_description,
        "random_weights": detector.uses_random_weights,
        "threshold": detector.threshold,
        "train_score_stats": detector.train_score_stats,
        "n_images": len(records),
        "n_defective": sum(1 for r in records if r.get("label")) if detector.threshold is not None else None,
        "images": records,
    }
    with atomic_write(json_path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return csv_path, json_path


#: The result set in OUT, replaced as a whole (a run without heatmaps removes earlier ones: nothing mixes).
RESULT_ENTRIES = ("scores.csv", "scores.json", "heatmaps")


def run(args: argparse.Namespace) -> int:
    from ..io.outputs import ResultFolder, check_readable_file
    from ..io.safety import check_image_names

    check_readable_file(args.model, "model file")
    files = collect_images(args.images, args.recursive)
    check_image_names(files)  # before any work: names go into the UTF-8 score tables
    check_image_names([args.output], "output folder")
    check_image_names([args.model], "model file")
    # Everything is written to a staging folder and put into OUT as one commit at the end (crd_fast.io.outputs);
    # OUT may not be, contain or lie inside anything this run reads (crd_fast.io.safety).
    results = ResultFolder(
        args.output,
        RESULT_ENTRIES,
        inputs=[args.model, *args.images, *files, args.weights, args.config],
        overwrite=args.overwrite,
        open=not args.distributed,  # a distributed run opens it once the ranks can agree on one
    )
    main = int(os.environ.get("RANK", "0")) == 0
    with results:
        names = heatmap_names(files)
        t0 = time.perf_counter()
        if args.distributed:
            records, detector = _predict_distributed(args, files, results, names)
        else:
            heat_dir = None if args.no_images else results.stage / "heatmaps"
            if heat_dir is not None:
                heat_dir.mkdir()
            detector = _load(args, args.device)
            records = _predict_local(detector, files, heat_dir, names, overlay_range(detector), progress_enabled(args))
        seconds = time.perf_counter() - t0
        if not main:
            return 0
        out = Path(args.output)
        if not args.no_images:
            for rec, name in zip(records, names):
                rec["heatmap"] = str(out / "heatmaps" / name)
        write_scores(results.stage, records, detector, args.model)
        results.commit()
    heat_final = None if args.no_images else out / "heatmaps"
    _summary(detector, records, seconds, out / "scores.csv", out / "scores.json", heat_final)
    return 0


def _summary(
    detector: CRDDetector,
    records: list[dict],
    seconds: float,
    csv_path: Path,
    json_path: Path,
    heat_dir: Optional[Path],
) -> None:
    n = len(records)
    echo(f"crd-fast predict: {n} images in {seconds:.1f} s ({1e3 * seconds / n:.1f} ms per image)")
    echo(f"  backbone:  {detector.weights_description}")
    if detector.threshold is not None:
        flagged = sum(1 for r in records if r.get("label"))
        echo(f"  threshold: {detector.threshold:.6g} -> {flagged} of {n} images flagged as defective")
    else:
        echo("  threshold: none in the model (scores only; use --threshold, or fit with --calibrate)")
    top = sorted(records, key=lambda r: -r["image_score"])[:5]
    echo(
        "  highest scores: "
        + ", ".join(f"{Path(r['path']).parent.name}/{Path(r['path']).name} {r['image_score']:.4g}" for r in top)
    )
    echo(f"wrote {csv_path} and {json_path}" + (f"; heatmaps in {heat_dir}/" if heat_dir is not None else ""))
    if detector.uses_random_weights:
        warn("the model's backbone has RANDOM weights: its scores are not real inspection results")
