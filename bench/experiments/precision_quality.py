"""bf16 and int8 ONNX against float32 on the development set and the generated categories: AUROC, maps, speed.

    pip install elpv-dataset        # the development set (or: pip install crd-fast[quality])
    python bench/experiments/precision_quality.py --out precision_quality.json

What the precisions cost in detection quality, on real parts and on more generated test images than
bench/suites/bench_precision.py's 24. Data (quality_data.py here): the elpv polycrystalline cells, the seeded
split (200 training, 100 good + 100 defective test cells, 160 px, no crop), and the generated categories
(crd_fast.synthetic: 30 training, --synthetic-good good + --synthetic-defect defective test images each,
resize 183, crop 160 as quality.py here). One detector configuration: wide_resnet50_2 with seeded random
weights, layer2 + layer3, lam_rel 0.01 given explicitly (and spatial="global" where the detector has that
option), so only the precision differs. Per data set:

* ``fp32`` and ``bf16`` detectors, each fitted on the training images in its own precision (as the product
  fits), score the test images: image AUROC, largest image-score difference, anomaly-map differences
  (largest and 99.9th percentile of |map - fp32 map|, relative to fp32's largest map value);
* the fp32 detector exported to float32 ONNX and to int8 ONNX (``crd_fast.deploy.quantize``, calibrated on
  the first --calibration-images training images, the export's default count, head refitted on the int8
  backbone's features of all training images) scores them the same way; so does the int8 export that keeps
  the float32-fitted head (``refit_head=False``, "onnx-int8 float head"; not timed: same graph);
* speed: one normalised batch of 8 through all four (torch fp32, torch bf16, ONNX fp32, ONNX int8),
  round-robin (--rounds after a warm-up round), images/s from the best and the median round.

Random weights: the AUROCs are not the product's accuracy; the deltas between precisions are the point.
The results are written to --out after every data set (JSON) and printed as a table at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_data import elpv_images, synthetic_images  # noqa: E402

from crd_fast.benchmark.machine import machine_info, require_fused_cpu_pass  # noqa: E402
from crd_fast.benchmark.timing import time_interleaved  # noqa: E402
from crd_fast.core.precision import cpu_flags, resolve_precision  # noqa: E402
from crd_fast.deploy import OnnxDetector, export_onnx  # noqa: E402
from crd_fast.deploy.quantize import (  # noqa: E402
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CALIBRATION_METHOD,
    export_onnx_int8,
)
from crd_fast.detector.config import DetectorConfig  # noqa: E402
from crd_fast.detector.detector import CRDDetector  # noqa: E402
from crd_fast.metrics.scores import image_auroc  # noqa: E402

BATCH = 8
LAM_REL = 0.01


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test-good", type=int, default=100)
    p.add_argument("--n-test-bad", type=int, default=100)
    p.add_argument("--size", type=int, default=160, help="elpv cells resized to size x size (no crop)")
    p.add_argument("--no-elpv", action="store_true")
    p.add_argument("--synthetic", nargs="*", default=["fabric", "stone", "cap"])
    p.add_argument("--synthetic-train", type=int, default=30)
    p.add_argument("--synthetic-good", type=int, default=20)
    p.add_argument("--synthetic-defect", type=int, default=20)
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES)
    p.add_argument(
        "--calibration-method",
        choices=sorted(CALIBRATION_METHODS),
        default=DEFAULT_CALIBRATION_METHOD,
        help="activation ranges of the int8 exports (default: the export's)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument(
        "--no-int8-float-head",
        action="store_true",
        help="skip the int8 export that keeps the float32-fitted head (refit_head=False; scored, not timed)",
    )
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "crd_precision_quality.json")
    return p.parse_args(argv)


def _chw(images: np.ndarray) -> torch.Tensor:
    """(K, H, W) grayscale or (K, H, W, 3) RGB uint8 -> (K, 3, H, W) uint8 (what the detector takes as a batch)."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    return t[:, None].expand(-1, 3, -1, -1) if t.ndim == 3 else t.permute(0, 3, 1, 2)


def detector_options() -> dict[str, Any]:
    """The fixed options: explicit lam_rel, and the global model where the detector offers a choice."""
    options: dict[str, Any] = {"lam_rel": LAM_REL}
    if "spatial" in {f.name for f in dataclasses.fields(DetectorConfig)}:
        options["spatial"] = "global"
    return options


def _compare(base: dict[str, np.ndarray], other: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    top = float(np.abs(base["maps"]).max())
    diff = np.abs(other["maps"] - base["maps"])
    return {
        "image_auroc": image_auroc(labels, other["scores"]),
        "image_auroc_delta": image_auroc(labels, other["scores"]) - image_auroc(labels, base["scores"]),
        "score_max_rel_diff": float(np.abs(other["scores"] - base["scores"]).max() / np.abs(base["scores"]).max()),
        "map_max_rel_diff": float(diff.max() / top),
        "map_p999_rel_diff": float(np.quantile(diff, 0.999) / top),
        "map_mean_rel_diff": float(diff.mean() / top),
        # pairs (good, defective) whose order differs from fp32's: what moves the AUROC
        "pairs_flipped": int(_pair_order_changes(base["scores"], other["scores"], labels)),
    }


def _pair_order_changes(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> int:
    good, bad = labels == 0, labels == 1
    oa = a[bad][:, None] > a[good][None, :]
    ob = b[bad][:, None] > b[good][None, :]
    return int((oa != ob).sum())


def run_dataset(name: str, train: torch.Tensor, test: torch.Tensor, labels: np.ndarray, resize: int, crop: int, args):
    print(
        f"== {name}: {len(train)} train, {int((labels == 0).sum())} good + {int(labels.sum())} defective test, "
        f"resize {resize} crop {crop}",
        flush=True,
    )
    options = detector_options()
    dets: dict[str, CRDDetector] = {}
    fit_s: dict[str, float] = {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for precision in ("fp32", "bf16"):
        det = CRDDetector(
            backbone="wide_resnet50_2",
            weights="random",
            seed=args.seed,
            resize=resize,
            crop=crop,
            batch_size=BATCH,
            precision=precision,
            **options,
        )
        t0 = time.perf_counter()
        det.fit(train, progress=False)
        fit_s[precision] = time.perf_counter() - t0
        r = det.predict(test, progress=False)
        out[precision] = {"scores": np.asarray(r.image_scores, np.float64), "maps": np.asarray(r.anomaly_maps)}
        dets[precision] = det
        print(
            f"  {precision}: fit {fit_s[precision]:.1f} s, image AUROC "
            f"{image_auroc(labels, out[precision]['scores']):.4f}",
            flush=True,
        )
    x = dets["fp32"].preprocess.batch(test[:BATCH]).contiguous()
    paths: dict[str, Any] = {}
    for precision, det in dets.items():
        model = det.inference_model()

        def call(model=model) -> Any:
            with torch.inference_mode():
                return model(x)

        paths[f"torch-{precision}"] = call
    export_s: dict[str, float] = {}
    if not args.no_onnx:
        with tempfile.TemporaryDirectory(prefix="crd_precq_") as tmp:
            t0 = time.perf_counter()
            onnx = {"onnx-fp32": OnnxDetector(export_onnx(dets["fp32"], Path(tmp) / "fp32.onnx").onnx_path)}
            export_s["onnx-fp32"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            int8 = export_onnx_int8(
                dets["fp32"],
                Path(tmp) / "int8.onnx",
                train,
                calibration_images=args.calibration_images,
                calibration_method=args.calibration_method,
            )
            onnx["onnx-int8"] = OnnxDetector(int8.onnx_path)
            export_s["onnx-int8"] = time.perf_counter() - t0
            if not args.no_int8_float_head:  # the export before the head refit: what the refit changes
                t0 = time.perf_counter()
                int8_float_head = export_onnx_int8(
                    dets["fp32"],
                    Path(tmp) / "int8_float_head.onnx",
                    train,
                    calibration_images=args.calibration_images,
                    calibration_method=args.calibration_method,
                    refit_head=False,
                )
                onnx["onnx-int8-float-head"] = OnnxDetector(int8_float_head.onnx_path)
                export_s["onnx-int8-float-head"] = time.perf_counter() - t0
            xn = x.numpy()
            for key, sess in onnx.items():
                scores, maps = [], []
                for s in range(0, len(test), BATCH):
                    sc, am, _ = sess.run(dets["fp32"].preprocess.batch(test[s : s + BATCH]).contiguous().numpy())
                    scores.append(sc)
                    maps.append(am)
                out[key] = {"scores": np.concatenate(scores), "maps": np.concatenate(maps)}
                if key != "onnx-int8-float-head":  # same graph and speed as onnx-int8 but for the head's values
                    paths[key] = lambda sess=sess: sess.run(xn)
                print(
                    f"  {key}: export {export_s[key]:.1f} s, image AUROC {image_auroc(labels, out[key]['scores']):.4f}",
                    flush=True,
                )
            load_before = os.getloadavg()
            timings = time_interleaved(paths, rounds=args.rounds, warmup=1)
    else:
        load_before = os.getloadavg()
        timings = time_interleaved(paths, rounds=args.rounds, warmup=1)
    load_after = os.getloadavg()
    ips = {k: BATCH / t.best for k, t in timings.items()}
    ips_med = {k: BATCH / t.median for k, t in timings.items()}
    quality = {"fp32": _compare(out["fp32"], out["fp32"], labels), "bf16": _compare(out["fp32"], out["bf16"], labels)}
    if "onnx-fp32" in out:
        quality["onnx-fp32 vs fp32"] = _compare(out["fp32"], out["onnx-fp32"], labels)
        quality["onnx-int8 vs onnx-fp32"] = _compare(out["onnx-fp32"], out["onnx-int8"], labels)
        if "onnx-int8-float-head" in out:
            quality["onnx-int8 float head vs onnx-fp32"] = _compare(
                out["onnx-fp32"], out["onnx-int8-float-head"], labels
            )
    ratios = {"bf16 / fp32 (torch)": ips["torch-bf16"] / ips["torch-fp32"]}
    ratios_med = {"bf16 / fp32 (torch)": ips_med["torch-bf16"] / ips_med["torch-fp32"]}
    if "onnx-int8" in ips:
        for k, (a, b) in {
            "int8 / fp32 (ONNX)": ("onnx-int8", "onnx-fp32"),
            "int8 ONNX / fp32 torch": ("onnx-int8", "torch-fp32"),
            "int8 ONNX / bf16 torch": ("onnx-int8", "torch-bf16"),
        }.items():
            ratios[k], ratios_med[k] = ips[a] / ips[b], ips_med[a] / ips_med[b]
    return {
        "train": len(train),
        "test_good": int((labels == 0).sum()),
        "test_defective": int(labels.sum()),
        "resize": resize,
        "crop": crop,
        "detector_options": options,
        "fit_s_not_round_robin": fit_s,
        "export_s": export_s,
        "quality": quality,
        "images_per_s_best": ips,
        "images_per_s_median": ips_med,
        "speed_ratio_best": ratios,
        "speed_ratio_median": ratios_med,
        "load_average_during_timing": {"before": load_before, "after": load_after},
    }


def _table(results: dict[str, Any]) -> str:
    lines = [
        "| data set | path | image AUROC | delta vs reference | pairs flipped | max score diff | max map diff "
        "| p99.9 map diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if not isinstance(r, dict) or "quality" not in r:
            continue
        for path, q in r["quality"].items():
            lines.append(
                f"| {name} | {path} | {q['image_auroc']:.4f} | {q['image_auroc_delta']:+.4f} | {q['pairs_flipped']} "
                f"| {q['score_max_rel_diff']:.1e} | {q['map_max_rel_diff']:.1e} | {q['map_p999_rel_diff']:.1e} |"
            )
    lines += [
        "",
        "| data set | " + " | ".join(["torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8"]) + " | ratios |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        if not isinstance(r, dict) or "images_per_s_best" not in r:
            continue
        cells = [
            f"{r['images_per_s_best'].get(k, float('nan')):.2f}"
            for k in ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
        ]
        ratio = "; ".join(f"{k} {v:.2f}x" for k, v in r["speed_ratio_best"].items())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    require_fused_cpu_pass()
    results: dict[str, Any] = {
        "command": "python bench/experiments/precision_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine_info(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni"))),
        "auto": resolve_precision("auto", "cpu").describe(),
        "backbone": "wide_resnet50_2 (seeded random weights), layer2 + layer3",
    }
    sets = []
    if not args.no_elpv:
        split = argparse.Namespace(
            seed=args.seed,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_bad=args.n_test_bad,
            n_held_out=0,
        )
        sets.append(("elpv_poly", lambda: elpv_images(split), args.size, args.size))
    for cat in args.synthetic:
        sets.append(
            (
                f"synthetic_{cat}",
                lambda cat=cat: synthetic_images(
                    cat, args.seed, args.synthetic_train, args.synthetic_good, args.synthetic_defect
                ),
                183,
                160,
            )
        )
    for name, load, resize, crop in sets:
        train, test, labels = load()
        results[name] = run_dataset(name, _chw(train), _chw(test), np.asarray(labels), resize, crop, args)
        results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        args.out.write_text(json.dumps(results, indent=1))
    print(_table(results))
    return results


if __name__ == "__main__":
    main()
