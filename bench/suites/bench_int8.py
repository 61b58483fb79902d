"""int8 ONNX against float32 ONNX: images/s (onnxruntime, CPU) and the AUROC cost, one run.

    python -m pytest bench/suites/bench_int8.py -s --benchmark-columns=min,median,rounds

A wide_resnet50_2 detector (seeded random weights, layer2 + layer3, 224 px) is fitted on generated demo
images (crd_fast.synthetic, ``fabric``), exported to float32 ONNX and to int8 ONNX (backbone statically
quantized, calibrated on the same training images: ``crd_fast.deploy.quantize``). Both files run in
onnxruntime on the same normalised batch of 8, timed round-robin; then both score the test images
(image and pixel AUROC). Sizes: CRD_INT8_TRAIN (default 32, also the calibration set), CRD_INT8_TEST_GOOD
(8), CRD_INT8_TEST_DEFECT (16), CRD_INT8_ROUNDS (3). Random weights: AUROC deltas, not accuracy.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crd_fast.benchmark.machine import machine_info
from crd_fast.benchmark.timing import RoundRobin
from crd_fast.core.precision import cpu_flags
from crd_fast.deploy import OnnxDetector, export_onnx
from crd_fast.deploy.quantize import export_onnx_int8
from crd_fast.detector.detector import CRDDetector
from crd_fast.features.preprocess import load_image
from crd_fast.metrics.scores import image_auroc, pixel_auroc
from crd_fast.synthetic import generate_dataset

N_TRAIN = int(os.environ.get("CRD_INT8_TRAIN", "32"))
N_GOOD = int(os.environ.get("CRD_INT8_TEST_GOOD", "8"))
N_DEFECT = int(os.environ.get("CRD_INT8_TEST_DEFECT", "16"))
ROUNDS = int(os.environ.get("CRD_INT8_ROUNDS", "3"))
BATCH, CROP = 8, 224
RESULTS_JSON = Path(os.environ.get("CRD_INT8_JSON", Path(tempfile.gettempdir()) / "crd_bench_int8.json"))


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("int8")
    files = generate_dataset(
        root, ("fabric",), n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defect=N_DEFECT, seed=0
    ).files["fabric"]
    det = CRDDetector(backbone="wide_resnet50_2", weights="random", resize=256, crop=CROP, batch_size=BATCH)
    det.fit(files["train/good"], progress=False)
    fp32 = export_onnx(det, root / "fp32.onnx")
    int8 = export_onnx_int8(det, root / "int8.onnx", files["train/good"], calibration_images=N_TRAIN)
    test = [p for k, v in files.items() if k.startswith("test/") for p in v]
    labels = np.array([0 if p.parent.name == "good" else 1 for p in test])
    truth = root / "fabric" / "ground_truth"
    masks = np.stack(
        [
            np.zeros((CROP, CROP), bool)
            if y == 0
            else np.asarray(
                load_image(str(truth / p.parent.name / f"{p.stem}_mask.png")).convert("L").resize((CROP, CROP))
            )
            > 127
            for p, y in zip(test, labels)
        ]
    )
    x = det.preprocess.batch(torch.rand(BATCH, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))).numpy()
    return {
        "fp32": OnnxDetector(fp32.onnx_path),
        "int8": OnnxDetector(int8.onnx_path),
        "x": x,
        "test": test,
        "labels": labels,
        "masks": masks,
        "sizes_mib": {"fp32": os.path.getsize(fp32.onnx_path) / 2**20, "int8": os.path.getsize(int8.onnx_path) / 2**20},
    }


def test_int8_vs_fp32_onnx(benchmark, case: dict[str, Any]) -> None:
    x = case["x"]
    rr = RoundRobin({name: (lambda d=case[name]: d.run(x)) for name in ("fp32", "int8")})
    rr()
    rr.reset()
    benchmark.group = f"ONNX int8 vs fp32 wide_resnet50_2 {CROP}px batch {BATCH}"
    benchmark.pedantic(rr, rounds=ROUNDS, warmup_rounds=0)
    ips = {n: BATCH / t.best for n, t in rr.timings.items()}
    preds = {n: case[n].predict([str(p) for p in case["test"]]) for n in ("fp32", "int8")}
    quality = {
        n: {
            "image_auroc": image_auroc(case["labels"], r.image_scores),
            "pixel_auroc": pixel_auroc(case["masks"], r.anomaly_maps),
        }
        for n, r in preds.items()
    }
    out = {
        "machine": machine_info(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni"))),
        "sizes": {
            "train_and_calibration": N_TRAIN,
            "test_good": N_GOOD,
            "test_defect": N_DEFECT,
            "batch": BATCH,
            "crop": CROP,
            "rounds": ROUNDS,
            "backbone": "wide_resnet50_2 (seeded random weights)",
        },
        "images_per_s_best": ips,
        "images_per_s_median": {n: BATCH / t.median for n, t in rr.timings.items()},
        "int8_speedup": ips["int8"] / ips["fp32"],
        "quality": quality,
        "image_auroc_delta": quality["int8"]["image_auroc"] - quality["fp32"]["image_auroc"],
        "score_max_rel_diff": float(
            np.abs(preds["int8"].image_scores - preds["fp32"].image_scores).max()
            / np.abs(preds["fp32"].image_scores).max()
        ),
        "file_mib": case["sizes_mib"],
    }
    RESULTS_JSON.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
