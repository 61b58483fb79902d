"""Deployment benchmark: onnxruntime (CPU) vs eager torch, model file sizes, and head-variant score errors.

    # full run (wide_resnet50_2, 224 px, batch 8):
    python -m pytest bench/suites/bench_deploy.py -s --benchmark-columns=mean,stddev,rounds
    # short check run (resnet18, 112 px):
    CRD_BENCH_QUICK=1 python -m pytest bench/suites/bench_deploy.py -s --benchmark-columns=mean,rounds

Backbone weights are seeded random (no network here): throughput and sizes do not depend on them, and
the score errors are measured on the features they give. Compare ratios, not absolute times.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from crd_fast import CRDScorer
from crd_fast.deploy import DeployHead, OnnxDetector, export_onnx, measure_error, rank_for_error_bound
from crd_fast.detector.detector import CRDDetector
from crd_fast.synthetic import render_sample

QUICK = os.environ.get("CRD_BENCH_QUICK", "") not in ("", "0")
BACKBONE = os.environ.get("CRD_BENCH_BACKBONE", "resnet18" if QUICK else "wide_resnet50_2")
CROP = int(os.environ.get("CRD_BENCH_CROP", 112 if QUICK else 224))
BATCH = int(os.environ.get("CRD_BENCH_BATCH", 8))
N_TRAIN = int(os.environ.get("CRD_BENCH_TRAIN", 8 if QUICK else 32))
THREADS = torch.get_num_threads()
RESULTS: dict[str, float] = {}


def images(n: int, defect: bool = False) -> list[np.ndarray]:
    size = CROP * 8 // 7
    return [
        render_sample(
            "fabric",
            size=max(64, size),
            seed=0,
            defect="hole" if defect else None,
            index=i,
            split="test" if defect else "train",
        )[0]
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def setup():
    folder = Path(tempfile.mkdtemp(prefix="crd_bench_deploy_"))
    det = CRDDetector(
        backbone=BACKBONE,
        weights="random",
        resize=CROP * 8 // 7,
        crop=CROP,
        batch_size=BATCH,
        spatial="global",
        lam_rel=0.01,
    )
    det.fit(images(N_TRAIN), progress=False)
    det.save(folder / "model.crd")
    whole = export_onnx(det, folder / "model.onnx")
    runtime = OnnxDetector(whole.onnx_path, threads=THREADS)
    x = torch.stack([det.preprocess(im) for im in images(BATCH, defect=True)])
    return folder, det, runtime, x


def test_eager_torch(benchmark, setup):
    _, det, _, x = setup
    model = det.inference_model()

    def run():
        with torch.inference_mode():
            return model(x)

    benchmark.group = "deploy throughput"
    benchmark.pedantic(run, rounds=3 if QUICK else 10, warmup_rounds=1)
    RESULTS["torch_img_s"] = BATCH / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = RESULTS["torch_img_s"]


def test_onnxruntime_cpu(benchmark, setup):
    _, _, runtime, x = setup
    batch = x.numpy()
    benchmark.group = "deploy throughput"
    benchmark.pedantic(runtime.run, args=(batch,), rounds=3 if QUICK else 10, warmup_rounds=1)
    RESULTS["ort_img_s"] = BATCH / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = RESULTS["ort_img_s"]


def test_summary_throughput_and_sizes(setup):
    folder, det, _, _ = setup
    grid = det.patch_grid[0] * det.patch_grid[1]
    mb = 1e6
    for name in ("fp16", "fp32"):
        export_onnx(det, folder / f"head_{name}.onnx", head_only=True, precision=name)
    DeployHead.from_scorer(det.model.scorer, "fp16").save(folder / "head_fp16.crdh")
    rows = [
        ("CRD detector file (float64 statistics + M_pre)", (folder / "model.crd").stat().st_size),
        ("CRD head file, fp16 M_pre", (folder / "head_fp16.crdh").stat().st_size),
        ("ONNX whole detector (fp32)", (folder / "model.onnx").stat().st_size),
        ("ONNX head only, fp32", (folder / "head_fp32.onnx").stat().st_size),
        ("ONNX head only, fp16", (folder / "head_fp16.onnx").stat().st_size),
        (
            f"NN memory bank, same training set ({det.n_images} img x {grid} patches x {det.dim} float32)",
            det.n_images * grid * det.dim * 4,
        ),
        ("NN memory bank, 200 img x 784 patches x 1536 float32 (wide_resnet50_2 at 224 px)", 200 * 784 * 1536 * 4),
        ("CRD file at d=1536 (mean, scatter, M_pre float64; any number of images)", (2 * 1536 * 1536 + 2 * 1536) * 8),
        ("CRD head file at d=1536, fp16", 1536 * 1536 * 2 + 1536 * 8),
    ]
    print(f"\n{BACKBONE} random weights, {CROP} px, batch {BATCH}, {THREADS} threads")
    if "torch_img_s" in RESULTS and "ort_img_s" in RESULTS:
        print(
            f"images/s: eager torch {RESULTS['torch_img_s']:.2f}, onnxruntime CPU {RESULTS['ort_img_s']:.2f}, "
            f"ratio ort/torch {RESULTS['ort_img_s'] / RESULTS['torch_img_s']:.2f}"
        )
    for label, size in rows:
        print(f"  {size / mb:10.2f} MB  {label}")


def test_summary_score_errors(setup):
    """Relative score errors of head variants vs the exact float64 model, on the synthetic set and random features."""
    _, det, _, _ = setup
    test = images(8) + images(8, defect=True)
    x = torch.stack([det.preprocess(im) for im in test])
    with torch.inference_mode():
        emb = torch.cat([det.embed(x[i : i + BATCH]) for i in range(0, len(test), BATCH)])
    grid = emb.shape[2] * emb.shape[3]
    synthetic = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).float()
    gen = torch.Generator().manual_seed(0)
    d = 256 if QUICK else 1536
    basis = torch.randn(d, d // 8, generator=gen) / (1 + torch.arange(d // 8)).sqrt()
    fit = torch.randn(20 * 784, d // 8, generator=gen) @ basis.T + 0.05 * torch.randn(20 * 784, d, generator=gen)
    rand_scorer = CRDScorer().fit(fit)
    random_feats = (
        torch.randn(16 * 784, d // 8, generator=gen) @ basis.T + 0.2 * torch.randn(16 * 784, d, generator=gen)
    ).float()
    cases = [
        (det.model.scorer, synthetic, grid, f"synthetic fabric set, {len(test)} images, d={det.dim}"),
        (rand_scorer, random_feats, 784, f"random features, 16 x 784 patches, d={d}"),
    ]
    for scorer, feats, per_image, label in cases:
        print(
            f"\n{label}\n  variant              image max / mean rel    patch max / mean rel    error bound  matrix MB"
        )
        r10 = rank_for_error_bound(scorer, 0.1)  # smallest rank with error bound <= 0.1 (None: only full rank)
        variants = [("fp32", None), ("fp16", None), ("fp32", scorer.dim // 2), ("fp16", scorer.dim // 2)]
        print(f"  (rank for error bound 0.1: {r10 if r10 is not None else 'full'} of {scorer.dim})")
        for precision, rank in variants + ([("fp32", r10), ("fp16", r10)] if r10 is not None else []):
            e = measure_error(scorer, feats, per_image, precision, rank)
            name = f"{precision}" + (f" rank {rank}" if rank else " full")
            print(
                f"  {name:<18} {e['image_max_rel']:10.2e} / {e['image_mean_rel']:8.2e}  {e['patch_max_rel']:10.2e} / "
                f"{e['patch_mean_rel']:8.2e}  {e['error_bound']:10.3g}  {e['matrix_bytes'] / 1e6:8.2f}"
            )
