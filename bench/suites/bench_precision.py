"""Detector end to end per compute precision, its AUROC cost, and the head's FLOP rate against the backbone's.

    python -m pytest bench/suites/bench_precision.py -s --benchmark-columns=min,median,rounds

One run, on generated demo data (crd_fast.synthetic, category ``fabric``): a wide_resnet50_2 detector with
seeded random weights (layer2 + layer3, 224 px, batch 8) per path:

* ``fp32-contig``: float32, contiguous NCHW (the detector before compute precisions existed);
* ``fp32``: float32, channels_last (measured for comparison; the detector's fp32 is contiguous, exact);
* ``bf16``: bf16 autocast + channels_last backbone, bf16 projection GEMM in the head (float64 statistics).

Each is fitted on the same training images (fit seconds), then predict is timed round-robin on the same
normalised batch (images/s) and the test images are scored (image and pixel AUROC; largest anomaly-map
difference relative to fp32's largest value). The backbone and the head are also timed round-robin per
precision, and their GFLOP/s are computed from analytic FLOP counts (2 x multiply-adds): every Conv2d of
the backbone (counted by shape with forward hooks), and the head's two projection GEMMs (the fused pass's
pooling/interpolation adds are not counted, so the head's rate is a lower bound). Sizes:
CRD_PREC_TRAIN (default 32), CRD_PREC_TEST_GOOD (8), CRD_PREC_TEST_DEFECT (16), CRD_PREC_ROUNDS (3).
float16 is not timed on the CPU: without AVX512_FP16 torch emulates it (several times slower than fp32).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from crd_fast.benchmark.machine import machine_info
from crd_fast.benchmark.timing import RoundRobin
from crd_fast.core.precision import cpu_flags, head_gemm_dtype, resolve_precision
from crd_fast.detector.detector import CRDDetector
from crd_fast.features.preprocess import load_image
from crd_fast.metrics.scores import image_auroc, pixel_auroc
from crd_fast.synthetic import generate_dataset

N_TRAIN = int(os.environ.get("CRD_PREC_TRAIN", "32"))
N_GOOD = int(os.environ.get("CRD_PREC_TEST_GOOD", "8"))
N_DEFECT = int(os.environ.get("CRD_PREC_TEST_DEFECT", "16"))
ROUNDS = int(os.environ.get("CRD_PREC_ROUNDS", "3"))
BATCH, CROP, BACKBONE = 8, 224, "wide_resnet50_2"
PATHS = ("fp32-contig", "fp32", "bf16")
RESULTS_JSON = Path(os.environ.get("CRD_PREC_JSON", Path(tempfile.gettempdir()) / "crd_bench_precision.json"))


def conv_flops(extractor: nn.Module, x: torch.Tensor) -> float:
    """2 x multiply-adds of every Conv2d / Linear in one forward of ``x`` (from the layers' shapes)."""
    total = 0.0

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += 2.0 * output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += 2.0 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in extractor.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            extractor(x)
    finally:
        for h in handles:
            h.remove()
    return total


def head_flops(maps: list[torch.Tensor], rank: int) -> float:
    """2 x multiply-adds of the head's per-layer projection GEMMs: sum_l B H_l W_l C_l r."""
    return 2.0 * sum(m.shape[0] * m.shape[1] * m.shape[2] * m.shape[3] for m in maps) * rank


def _choice(path: str):
    return None if path == "fp32-contig" else resolve_precision(path.split("-")[0], "cpu")


def _set_path(det: CRDDetector, path: str) -> None:
    det.extractor.set_precision(_choice(path))
    if path == "fp32":  # float32 channels_last: weights in that layout make the convolutions follow it
        det.extractor.to(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("prec")
    data = generate_dataset(root, ("fabric",), n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defect=N_DEFECT, seed=0)
    files = data.files["fabric"]
    test_paths = [p for k, v in files.items() if k.startswith("test/") for p in v]
    labels = np.array([0 if "/test/good/" in str(p) else 1 for p in test_paths])
    masks = []
    for p, y in zip(test_paths, labels):
        if y == 0:
            masks.append(np.zeros((CROP, CROP), dtype=bool))
        else:
            mask_path = root / "fabric" / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
            masks.append(np.asarray(load_image(str(mask_path)).convert("L").resize((CROP, CROP))) > 127)
    detectors: dict[str, CRDDetector] = {}
    fit_s: dict[str, float] = {}
    for path in PATHS:
        det = CRDDetector(backbone=BACKBONE, weights="random", resize=CROP, crop=CROP, batch_size=BATCH, seed=0)
        _set_path(det, path)
        t0 = time.perf_counter()
        det.fit(files["train/good"], progress=False)
        _ = det.train_score_stats
        fit_s[path] = time.perf_counter() - t0
        detectors[path] = det
    return {"detectors": detectors, "fit_s": fit_s, "test": test_paths, "labels": labels, "masks": np.stack(masks)}


def test_precision_end_to_end(benchmark, case: dict[str, Any]) -> None:
    dets = case["detectors"]
    gen = torch.Generator().manual_seed(0)
    x = dets["fp32"].preprocess.batch(torch.rand(BATCH, 3, CROP, CROP, generator=gen)).contiguous()
    models = {p: d.inference_model() for p, d in dets.items()}

    def run(model: nn.Module):
        def call() -> Any:
            with torch.inference_mode():
                return model(x)

        return call

    rr = RoundRobin({p: run(m) for p, m in models.items()})
    rr()
    rr.reset()
    benchmark.group = f"precision end to end {BACKBONE} {CROP}px batch {BATCH}"
    benchmark.pedantic(rr, rounds=ROUNDS, warmup_rounds=0)

    quality: dict[str, dict[str, float]] = {}
    preds = {p: d.predict(case["test"], progress=False) for p, d in dets.items()}
    base = preds["fp32"]
    for p, r in preds.items():
        quality[p] = {
            "image_auroc": image_auroc(case["labels"], r.image_scores),
            "pixel_auroc": pixel_auroc(case["masks"], r.anomaly_maps),
            "map_max_rel_diff_vs_fp32": float(
                np.abs(r.anomaly_maps - base.anomaly_maps).max() / np.abs(base.anomaly_maps).max()
            ),
            "score_max_rel_diff_vs_fp32": float(
                np.abs(r.image_scores - base.image_scores).max() / np.abs(base.image_scores).max()
            ),
        }
    ips = {p: BATCH / t.best for p, t in rr.timings.items()}
    ips_med = {p: BATCH / t.median for p, t in rr.timings.items()}
    out = {
        "machine": machine_info(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni"))),
        "auto": resolve_precision("auto", "cpu").describe(),
        "sizes": {
            "train": N_TRAIN,
            "test_good": N_GOOD,
            "test_defect": N_DEFECT,
            "batch": BATCH,
            "crop": CROP,
            "backbone": f"{BACKBONE} (seeded random weights)",
            "rounds": ROUNDS,
        },
        "images_per_s_best": ips,
        "images_per_s_median": ips_med,
        "speedup_vs_fp32_contig": {p: ips[p] / ips["fp32-contig"] for p in ips},
        "speedup_vs_fp32_channels_last": {p: ips[p] / ips["fp32"] for p in ips},
        "fit_s": case["fit_s"],
        "quality": quality,
    }
    _merge(out)
    print(json.dumps(out, indent=1))
    for p in ips:
        benchmark.extra_info[f"{p}_images_per_s"] = ips[p]


def test_head_vs_backbone_gflops(benchmark, case: dict[str, Any]) -> None:
    dets = case["detectors"]
    gen = torch.Generator().manual_seed(1)
    x = dets["fp32"].preprocess.batch(torch.rand(BATCH, 3, CROP, CROP, generator=gen)).contiguous()
    fns, flops = {}, {}
    for p in ("fp32", "bf16"):
        model = dets[p].inference_model()
        with torch.inference_mode():
            maps = [m.clone() for m in model.extractor(x)]
        choice = model.extractor.precision
        flops[f"{p}/backbone"] = conv_flops(model.extractor, x)
        flops[f"{p}/head"] = head_flops(maps, model.head.rank)

        def backbone(model=model) -> Any:
            with torch.inference_mode():
                return model.extractor(x)

        def head(model=model, maps=maps, gemm=choice.head_gemm_dtype) -> Any:
            with torch.inference_mode(), head_gemm_dtype(gemm):
                return model.head(maps)

        fns[f"{p}/backbone"], fns[f"{p}/head"] = backbone, head
    rr = RoundRobin(fns)
    rr()
    rr.reset()
    benchmark.group = "head vs backbone GFLOP/s"
    benchmark.pedantic(rr, rounds=ROUNDS, warmup_rounds=0)
    rate = {k: flops[k] / rr.timings[k].best / 1e9 for k in fns}
    out = {
        "gflop": {k: v / 1e9 for k, v in flops.items()},
        "ms_best": {k: t.best * 1e3 for k, t in rr.timings.items()},
        "gflops_per_s": rate,
        "head_over_backbone_rate": {p: rate[f"{p}/head"] / rate[f"{p}/backbone"] for p in ("fp32", "bf16")},
        "head_share_of_time": {
            p: rr.timings[f"{p}/head"].best / (rr.timings[f"{p}/head"].best + rr.timings[f"{p}/backbone"].best)
            for p in ("fp32", "bf16")
        },
    }
    _merge({"head_vs_backbone": out})
    print(json.dumps(out, indent=1))


def _merge(part: dict[str, Any]) -> None:
    old = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}
    old.update(part)
    RESULTS_JSON.write_text(json.dumps(old, indent=1))
