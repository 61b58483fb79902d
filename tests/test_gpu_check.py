"""bench/gpu_check.py on the CPU: its self-test (argument parsing, tolerance model, report files) runs in CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_self_test_passes_in_process():
    assert gpu_check.self_test() == 0


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--seed", "-1"])
    assert "--seed must be non-negative" in capsys.readouterr().err


def test_half_precision_model_catches_a_wrong_rounding():
    """A kernel that skipped the one rounding of the embedding to bf16 would be off by far more than the tolerance."""
    gen = torch.Generator().manual_seed(gpu_check.DEFAULT_SEED)
    maps = [torch.randn(2, 40, 9, 9, generator=gen), torch.randn(2, 24, 5, 5, generator=gen)]
    maps = [m.to(torch.bfloat16) for m in maps]
    matrix, offset = torch.randn(65, 64, generator=gen) / 8, torch.randn(64, generator=gen)
    model = gpu_check.expected_scores(maps, matrix, offset, "concat", 1024, torch.bfloat16)
    unrounded = gpu_check.expected_scores(maps, matrix, offset, "concat", 1024, torch.float32)
    assert gpu_check.norm_rel(unrounded, model) > 10 * gpu_check.TOLERANCES["bfloat16"]


def test_without_a_gpu_the_check_exits_2_and_the_self_test_runs_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--self-test"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0 and "self-test: ok" in result.stdout, result.stderr
    if not torch.cuda.is_available():
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--no-timing"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 2 and "no CUDA device" in result.stdout


# ---- the correctness step against emulated kernels: a right one passes, a broken one fails ----------------
def _emulated_kernel(broken: str = ""):
    """A CPU stand-in for ``cuda.run`` computing what the kernels compute from the prepared operands."""
    from crd_fast.core.embedding import embed_patches, patch_matrix

    def run(ops, path, out=None, partial=None):
        emb = patch_matrix(embed_patches([m.double() for m in ops.maps], "concat"))
        if ops.dtype in (torch.float16, torch.bfloat16):
            emb = emb.to(ops.dtype).double()  # the kernel rounds each embedding value once to the operand type
        z = emb @ ops.matrix.double().T - ops.q.double()
        if broken == "second row tile lost":
            z[:, 64:] = 0
        scores = torch.linalg.vector_norm(z, dim=1).reshape(ops.out_shape)
        if broken == "last patch unwritten":
            scores.view(-1)[-1] = float("nan")
        if broken == "embedding not rounded" and ops.dtype in (torch.float16, torch.bfloat16):
            scores = torch.linalg.vector_norm(
                patch_matrix(embed_patches([m.double() for m in ops.maps], "concat")) @ ops.matrix.double().T
                - ops.q.double(),
                dim=1,
            ).reshape(ops.out_shape)
        out = ops.new_out() if out is None else out
        return out.copy_(scores)

    return run


def _cpu_run(monkeypatch, broken: str):
    from crd_fast.ops import cuda as kcuda

    args = gpu_check.parse_args(["--quick", "--seed", "11"])
    report = gpu_check.Report()
    run = object.__new__(gpu_check.GpuRun)
    run.torch, run.args, run.report = torch, args, report
    run.dev, run.cap, run.paths = torch.device("cpu"), (8, 0), ["native"]
    run.kcuda = kcuda
    monkeypatch.setattr(kcuda, "run", _emulated_kernel(broken))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: type("P", (), {"total_memory": 0})())
    run.correctness()
    return report


def test_correctness_step_passes_a_right_kernel(monkeypatch):
    report = _cpu_run(monkeypatch, "")
    bad = [c for c in report.checks if c.ok is False]
    assert not bad, bad
    kernel_checks = [c for c in report.checks if c.step == "correctness"]
    assert len(kernel_checks) == 5 * 4 and all(c.error is not None and c.error < c.tol for c in kernel_checks)
    assert any(c.step == "edge" and "2^31" in c.name and c.ok is None for c in report.checks)  # no room here


@pytest.mark.parametrize("broken", ["second row tile lost", "last patch unwritten", "embedding not rounded"])
def test_correctness_step_fails_a_broken_kernel(monkeypatch, broken):
    report = _cpu_run(monkeypatch, broken)
    failed = [c for c in report.checks if c.step == "correctness" and c.ok is False]
    assert failed and report.status() == 1
    if broken == "second row tile lost":
        assert all("r=70" in c.name or "r=65" in c.name for c in failed)
    if broken == "embedding not rounded":
        assert {c.name.rsplit(" ", 1)[1] for c in failed} <= {"float16", "bfloat16"} and len(failed) >= 4


def test_bit_comparison_and_sanitizer_steps(monkeypatch, tmp_path):
    report = gpu_check.Report()
    run = object.__new__(gpu_check.GpuRun)
    from crd_fast.ops import cuda as kcuda

    run.torch, run.args, run.report = torch, gpu_check.parse_args(["--seed", "3"]), report
    run.dev, run.cap = torch.device("cpu"), (8, 0)
    run.kcuda, run.paths = kcuda, ["native"]
    monkeypatch.setattr(kcuda, "run", _emulated_kernel())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(kcuda, "run_residual", _emulated_residual_kernel())
    run.native_vs_cupy()
    assert [c.ok for c in report.checks] == [None]  # one path only: said, not passed
    run.paths = ["native", "cupy"]
    run.native_vs_cupy()
    assert [c.ok for c in report.checks[1:]] == [True] * 8  # head and residual, four dtypes each
    assert [c.name for c in report.checks[5:9]] == [
        f"residual native vs CuPy {t}" for t in ("float32", "float64", "float16", "bfloat16")
    ]
    report.checks[:] = report.checks[:5]
    # sanitizers: absent -> four skips; present -> each tool run on the target, filtered to the crd_ kernels
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: None)
    run.sanitizers()
    assert [(c.name, c.ok) for c in report.checks[5:]] == [(t, None) for t in gpu_check.SANITIZER_TOOLS]
    fake = tmp_path / "compute-sanitizer"
    fake.write_text('#!/bin/sh\necho "$@" > "$0.$2"\necho "sanitizer target: ok"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: str(fake))
    run.sanitizers()
    assert [c.ok for c in report.checks[9:]] == [True] * 4
    args = (tmp_path / "compute-sanitizer.racecheck").read_text().split()
    assert args[:6] == ["--tool", "racecheck", "--kernel-name", "kns=crd_", "--error-exitcode", "9"]
    assert args[-3:] == ["--sanitizer-target", "--seed", "3"]


# ---- the residual step against emulated residual kernels ----------------------------------------------------
def _emulated_residual_kernel(broken: str = ""):
    """A CPU stand-in for ``cuda.run_residual``: P' e_p - q[p mod (h0 w0)] from the prepared operands."""
    from crd_fast.core.embedding import embed_patches, patch_matrix

    def run(ops, path, out=None):
        emb = patch_matrix(embed_patches([m.double() for m in ops.maps], "concat"))
        if ops.dtype in (torch.float16, torch.bfloat16) and broken != "embedding not rounded":
            emb = emb.to(ops.dtype).double()
        b, h, w, r = ops.residual_shape
        q = ops.q.double()
        rows = (emb @ ops.matrix.double().T).reshape(b, h * w, r)
        rows = rows - (
            q if broken != "position order transposed" else q.reshape(h, w, r).transpose(0, 1).reshape(-1, r)
        )
        if broken == "last row unwritten":
            rows[:, :, -1] = float("nan")
        out = ops.new_residual_out() if out is None else out
        return out.copy_(rows.reshape(b, h, w, r))

    return run


def _cpu_residual_run(monkeypatch, broken: str):
    from crd_fast.ops import cuda as kcuda

    report = gpu_check.Report()
    run = object.__new__(gpu_check.GpuRun)
    run.torch, run.args, run.report = torch, gpu_check.parse_args(["--quick", "--seed", "13"]), report
    run.dev, run.cap, run.paths = torch.device("cpu"), (8, 0), ["native"]
    run.kcuda = kcuda
    monkeypatch.setattr(kcuda, "run_residual", _emulated_residual_kernel(broken))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    run.residual()
    return report


def test_residual_step_passes_a_right_kernel_and_checks_the_local_head(monkeypatch):
    report = _cpu_residual_run(monkeypatch, "")
    assert not [c for c in report.checks if c.ok is False], report.checks
    kernel_checks = [c for c in report.checks if c.step == "residual"]
    assert len(kernel_checks) == 5 * 4 and all(c.error is not None and c.error < c.tol for c in kernel_checks)
    local = [c for c in report.checks if c.step == "local head"]  # the CPU head here; CUDA's fused path on a GPU
    assert [c.name for c in local] == ["LocalCRDHead float32 vs LocalCRDModel", "LocalCRDHead float64 vs LocalCRDModel"]
    assert all(c.ok for c in local)


@pytest.mark.parametrize("broken", ["position order transposed", "last row unwritten", "embedding not rounded"])
def test_residual_step_fails_a_broken_kernel(monkeypatch, broken):
    report = _cpu_residual_run(monkeypatch, broken)
    failed = [c for c in report.checks if c.step == "residual" and c.ok is False]
    assert failed and report.status() == 1
    if broken == "embedding not rounded":
        assert {c.name.rsplit(" ", 1)[1] for c in failed} == {"float16", "bfloat16"}
    if broken == "position order transposed":  # every case but the single pixel, where the order cannot matter
        assert len(failed) == 4 * 4 and not any("single pixel" in c.name for c in failed)


def test_build_log_checks():
    report = gpu_check.Report()
    clean = (
        "ptxas info    : Function properties for crd_head_tile_f32\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    )
    gpu_check.check_build_log(clean, 0, report)
    assert [c.ok for c in report.checks] == [True, True]
    spilling = clean + "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
    gpu_check.check_build_log(spilling, 0, report)
    assert report.checks[-1].ok is False and "1 spilling" in report.checks[-1].note
    gpu_check.check_build_log("", 0, report)
    assert report.checks[-1].ok is False  # no ptxas report at all: the kernels were not built
