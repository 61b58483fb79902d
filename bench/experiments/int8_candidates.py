"""int8 export candidates side by side: image AUROC against float32 ONNX, pairs flipped, speed ratio.

    OMP_NUM_THREADS=1 python bench/experiments/int8_candidates.py --sets cap fabric stone elpv \
        --candidates minmax percentile entropy symmetric per_tensor all_minmax all_percentile percentile_last_blocks

Per data set, the fp32 detector (wide_resnet50_2 with seeded random weights, layer2 + layer3, lam_rel 0.01,
global: precision_quality.py's detector and data) is fitted once and exported to float32 ONNX once; then every
candidate is exported with ``export_onnx_int8`` (head refitted, stem float, 32 calibration images unless the
candidate says otherwise) and scores the test images. "pairs flipped" counts (good, defective) pairs whose order
differs from float32 ONNX's. The speed ratio is float32 / int8 ONNX on one batch, round-robin, best of 3.
This is where the calibration table of bench/RESULTS.md ("int8 ONNX accuracy: percentile activation ranges")
comes from; the export's default is the candidate that kept every set within 0.01.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_quality import BATCH, _chw, _pair_order_changes, detector_options  # noqa: E402
from quality_data import elpv_images, synthetic_images  # noqa: E402

from crd_fast.benchmark.machine import machine_info, require_fused_cpu_pass  # noqa: E402
from crd_fast.benchmark.timing import time_interleaved  # noqa: E402
from crd_fast.core.precision import cpu_flags  # noqa: E402
from crd_fast.metrics.scores import image_auroc  # noqa: E402

#: Enough to take every training image of every set as calibration images.
ALL_IMAGES = 100_000


def last_block_nodes(graph: Any, layers: tuple[str, ...], kinds: tuple[str, ...]) -> list[str]:
    """Names of the backbone nodes of the last bottleneck block of each layer whose name contains one of ``kinds``."""
    names = [n.name for n in graph.node if n.name.startswith("/extractor/")]
    out = []
    for layer in layers:
        blocks = sorted({int(n.split(f"/{layer}.")[1].split("/")[0]) for n in names if f"/{layer}." in n})
        out += [n for n in names if f"/{layer}.{blocks[-1]}/" in n and any(k in n for k in kinds)]
    return out


#: candidate name -> export_onnx_int8 keyword arguments, given the float32 graph (for node names)
CANDIDATES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "minmax": lambda g: {"calibration_method": "minmax"},
    "percentile": lambda g: {"calibration_method": "percentile"},
    "entropy": lambda g: {"calibration_method": "entropy"},
    "symmetric": lambda g: {"calibration_method": "minmax", "symmetric_activations": True},
    "per_tensor": lambda g: {"calibration_method": "minmax", "per_channel": False},
    "all_minmax": lambda g: {"calibration_method": "minmax", "calibration_images": ALL_IMAGES},
    "all_percentile": lambda g: {"calibration_method": "percentile", "calibration_images": ALL_IMAGES},
    "percentile_last_blocks": lambda g: {
        "calibration_method": "percentile",
        "float_nodes": last_block_nodes(g, ("layer2", "layer3"), ("conv3", "Add", "Relu")),
    },
    "minmax_last_outputs": lambda g: {
        "calibration_method": "minmax",
        "float_nodes": last_block_nodes(g, ("layer2", "layer3"), ("Add", "Relu")),
    },
}


def _data(name: str) -> tuple[Any, Any, np.ndarray, int, int]:
    if name == "elpv":  # the poly development split of precision_quality.py
        split = argparse.Namespace(seed=0, n_train=200, n_test_good=100, n_test_bad=100, n_held_out=0)
        train, test, labels = elpv_images(split)
        resize = crop = 160
    else:
        train, test, labels = synthetic_images(name, 0, 30, 20, 20)
        resize, crop = 183, 160
    return _chw(train), _chw(test), np.asarray(labels), resize, crop


def run_set(name: str, candidates: list[str]) -> dict[str, Any]:
    import onnx

    from crd_fast.deploy import OnnxDetector, export_onnx
    from crd_fast.deploy.quantize import export_onnx_int8
    from crd_fast.detector.detector import CRDDetector

    train, test, labels, resize, crop = _data(name)
    det = CRDDetector(
        backbone="wide_resnet50_2",
        weights="random",
        seed=0,
        resize=resize,
        crop=crop,
        batch_size=BATCH,
        precision="fp32",
        **detector_options(),
    )
    det.fit(train, progress=False)
    batches = [det.preprocess.batch(test[s : s + BATCH]).contiguous().numpy() for s in range(0, len(test), BATCH)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="crd_int8c_") as tmp:
        fp32 = OnnxDetector(export_onnx(det, Path(tmp) / "fp32.onnx").onnx_path)
        graph = onnx.load(str(Path(tmp) / "fp32.onnx")).graph
        base = np.concatenate([fp32.run(b)[0] for b in batches]).astype(np.float64)
        for cand in candidates:
            options = CANDIDATES[cand](graph)
            t0 = time.perf_counter()
            int8 = OnnxDetector(export_onnx_int8(det, Path(tmp) / f"{cand}.onnx", train, **options).onnx_path)
            export_s = time.perf_counter() - t0
            scores = np.concatenate([int8.run(b)[0] for b in batches]).astype(np.float64)
            timing = time_interleaved(
                {"fp32": lambda: fp32.run(batches[0]), "int8": lambda: int8.run(batches[0])}, rounds=3, warmup=1
            )
            out[cand] = {
                "options": {k: v for k, v in options.items() if k != "float_nodes"},
                "float_nodes": options.get("float_nodes", []),
                "image_auroc_fp32_onnx": image_auroc(labels, base),
                "image_auroc_int8": image_auroc(labels, scores),
                "delta": image_auroc(labels, scores) - image_auroc(labels, base),
                "pairs_flipped": _pair_order_changes(base, scores, labels),
                "score_max_rel_diff": float(np.abs(scores - base).max() / np.abs(base).max()),
                "int8_over_fp32_speed_best": timing["fp32"].best / timing["int8"].best,
                "export_s": export_s,
            }
            r = out[cand]
            print(
                f"{name} {cand}: delta {r['delta']:+.4f}, {r['pairs_flipped']} pairs flipped, "
                f"speed {r['int8_over_fp32_speed_best']:.2f}x, export {export_s:.0f} s",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["cap"], help="elpv and/or generated categories (fabric, stone, cap)")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "crd_int8_candidates.json")
    args = p.parse_args(argv)
    require_fused_cpu_pass()
    results: dict[str, Any] = {
        "command": "python bench/experiments/int8_candidates.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni"))),
    }
    for name in args.sets:
        results[name] = run_set(name, args.candidates)
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
