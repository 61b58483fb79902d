"""The GPU check on the CPU: bench/gpu_check.py's own logic (arguments, reading pytest's results, the report), the
GPU tests collected and skipped cleanly, and their checks (tests/gpu/kernel_checks.py) run against emulated kernels:
a right kernel passes, a broken one fails."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu import kernel_checks
from gpu.kernel_checks import CHECKS, DTYPES, LOCAL_HEAD_TOLERANCES, TOLERANCES, check_case, norm_rel

from crd_fast.core.embedding import embed_patches, patch_matrix
from crd_fast.ops import head_op, residual_op

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


def test_the_script_and_the_tests_share_the_default_seed():
    assert gpu_check.DEFAULT_SEED == kernel_checks.DEFAULT_SEED and gpu_check.SEED_ENV == kernel_checks.SEED_ENV


def test_half_precision_model_catches_a_wrong_rounding():
    """A kernel that skipped the one rounding of the embedding to bf16 would be off by far more than the tolerance."""
    gen = torch.Generator().manual_seed(kernel_checks.DEFAULT_SEED)
    maps = [torch.randn(2, 40, 9, 9, generator=gen), torch.randn(2, 24, 5, 5, generator=gen)]
    maps = [m.to(torch.bfloat16) for m in maps]
    matrix, offset = torch.randn(65, 64, generator=gen) / 8, torch.randn(64, generator=gen)
    model = kernel_checks.expected_scores(maps, matrix, offset, "concat", 1024, torch.bfloat16)
    unrounded = kernel_checks.expected_scores(maps, matrix, offset, "concat", 1024, torch.float32)
    assert norm_rel(unrounded, model) > 10 * TOLERANCES["bfloat16"]
    q = torch.randn(81, 65, generator=gen)
    model = kernel_checks.expected_residuals(maps, matrix, q, "concat", 1024, torch.bfloat16)
    unrounded = kernel_checks.expected_residuals(maps, matrix, q, "concat", 1024, torch.float32)
    assert model.shape == (2, 9, 9, 65) and norm_rel(unrounded, model) > 10 * TOLERANCES["bfloat16"]


def test_norm_rel_edge_cases():
    assert norm_rel(torch.zeros(0, 3, 3), torch.zeros(0, 3, 3)) == 0.0
    assert norm_rel(torch.full((1, 2, 2), float("nan")), torch.ones(1, 2, 2)) == float("inf")
    assert norm_rel(torch.ones(1, 2, 2), torch.ones(1, 2, 3)) == float("inf")
    assert norm_rel(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)) == 0.0  # a rank-0 map: no division by zero


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skips of a machine without a GPU")
def test_the_gpu_tests_collect_and_skip_cleanly_here(tmp_path):
    """The script's own pytest run of tests/gpu: every test is collected and skipped for want of a device (none
    errors at import or collection), and each becomes a not-run check of the report."""
    args = gpu_check.parse_args(["--quick", "--no-sanitizer", "--out", str(tmp_path)])
    report = gpu_check.Report()
    gpu_check.run_gpu_tests(args, tmp_path, report)
    assert report.info["gpu_tests"]["returncode"] == 0
    assert len(report.checks) > 50 and all(c.ok is None for c in report.checks), report.checks[:3]
    assert {c.step for c in report.checks} == {"dispatch", "kernels", "streams"}  # sanitizer runs left out
    assert all(c.note == "needs a CUDA device" for c in report.checks)
    names = {c.name for c in report.checks}
    assert "test_kernels_match_the_reference[crd_residual-1 layer grid 7x9 r=70-bfloat16-cupy]" in names
    assert not any("wide_resnet50_2" in n or "2_31" in n for n in names)  # --quick leaves out the large inputs


# ---- the kernel checks against emulated kernels: a right one passes, a broken one fails ------------------------
def _emulated_head(broken: str = ""):
    """A CPU stand-in for a head launcher computing what the kernels compute from the prepared operands."""

    calls = [0]

    def launch(ops, out=None, partial=None):
        emb = patch_matrix(embed_patches([m.double() for m in ops.maps], "concat"))
        if ops.dtype in (torch.float16, torch.bfloat16) and broken != "embedding not rounded":
            emb = emb.to(ops.dtype).double()  # the kernel rounds each embedding value once to the operand type
        z = emb @ ops.matrix.double().T - ops.q.double()
        if broken == "second row tile lost":
            z[:, 64:] = 0
        scores = torch.linalg.vector_norm(z, dim=1).reshape(head_op.KERNELS.out_shape_of(ops))
        if broken == "last patch unwritten":
            scores.view(-1)[-1] = float("nan")
        out = head_op.KERNELS.new_out(ops) if out is None else out
        out.copy_(scores)
        if broken == "racy" and partial is not None:
            calls[0] += 1  # one more unit in the last place on every run: two runs never agree to the bit
            for _ in range(calls[0]):
                out.copy_(torch.nextafter(out, torch.full_like(out, float("inf"))))
        return out

    return launch


def _emulated_residual(broken: str = ""):
    """A CPU stand-in for a residual launcher: P' e_p - q[p mod (h0 w0)] from the prepared operands."""

    def launch(ops, out=None, partial=None):
        assert partial is None, "the residual kernels take no scratch"
        emb = patch_matrix(embed_patches([m.double() for m in ops.maps], "concat"))
        if ops.dtype in (torch.float16, torch.bfloat16) and broken != "embedding not rounded":
            emb = emb.to(ops.dtype).double()
        b, h, w, r = residual_op.KERNELS.out_shape_of(ops)
        q = ops.q.double()
        if broken == "position order transposed":
            q = q.reshape(h, w, r).transpose(0, 1).reshape(-1, r)
        rows = (emb @ ops.matrix.double().T).reshape(b, h * w, r) - q
        if broken == "last row unwritten":
            rows[:, :, -1] = float("nan")
        out = residual_op.KERNELS.new_out(ops) if out is None else out
        return out.copy_(rows.reshape(b, h, w, r))

    return launch


def _run_cases(op: str, launcher, seed: int) -> dict[str, object]:
    """Every case ``--quick`` keeps x dtype of ``op`` through ``launcher`` on the CPU: name -> Outcome."""
    check = CHECKS[op]
    outcomes = {}
    for i, case in enumerate(check.cases):
        if case.large:
            continue
        for dtype in DTYPES:
            name = f"{case.name} {kernel_checks.dtype_name(dtype)}"
            outcomes[name] = check_case(check, case, i, dtype, launcher, torch.device("cpu"), (8, 0), seed)
    return outcomes


def test_head_checks_pass_a_right_kernel():
    outcomes = _run_cases("crd_head", _emulated_head(), 11)
    assert len(outcomes) == 5 * 4
    bad = {name: o.describe() for name, o in outcomes.items() if not o.ok}
    assert not bad, bad


@pytest.mark.parametrize("broken", ["second row tile lost", "last patch unwritten", "embedding not rounded", "racy"])
def test_head_checks_fail_a_broken_kernel(broken):
    outcomes = _run_cases("crd_head", _emulated_head(broken), 11)
    failed = [name for name, o in outcomes.items() if not o.ok]
    assert failed
    if broken == "second row tile lost":  # only the cases with r > 64 have a second row tile
        assert all("r=70" in name or "r=65" in name for name in failed)
    if broken == "embedding not rounded":
        assert {name.rsplit(" ", 1)[1] for name in failed} <= {"float16", "bfloat16"} and len(failed) >= 4
    if broken == "racy":
        assert len(failed) == len(outcomes) and all("two runs differ" in outcomes[n].describe() for n in failed)


def test_residual_checks_pass_a_right_kernel_and_the_local_head_check_passes_here():
    outcomes = _run_cases("crd_residual", _emulated_residual(), 13)
    assert len(outcomes) == 5 * 4
    bad = {name: o.describe() for name, o in outcomes.items() if not o.ok}
    assert not bad, bad
    for dtype, tol in LOCAL_HEAD_TOLERANCES.items():  # the CPU head here; the fused CUDA path on a GPU
        error, out_dtype = kernel_checks.local_head_error(torch.device("cpu"), dtype, 13)
        assert out_dtype == dtype and error < tol, (dtype, error)


@pytest.mark.parametrize("broken", ["position order transposed", "last row unwritten", "embedding not rounded"])
def test_residual_checks_fail_a_broken_kernel(broken):
    outcomes = _run_cases("crd_residual", _emulated_residual(broken), 13)
    failed = [name for name, o in outcomes.items() if not o.ok]
    assert failed
    if broken == "embedding not rounded":
        assert {name.rsplit(" ", 1)[1] for name in failed} == {"float16", "bfloat16"}
    if broken == "position order transposed":  # every case but the single pixel, where the order cannot matter
        assert len(failed) == 4 * 4 and not any("single pixel" in name for name in failed)


def test_every_op_with_kernels_has_its_checks():
    """A new op with CUDA kernels gets GPU tests by adding its OpCheck (tests/gpu/kernel_checks.py)."""
    from crd_fast.ops import registry

    assert set(CHECKS) == {name for name, spec in registry.OPS.items() if spec.kernels is not None}
    for check in CHECKS.values():
        maps, matrix, second = check.inputs(1, [(2, 3, 5, 4), (2, 2, 3, 3)], 6)
        check.spec.check(maps, matrix, second, "concat", 1024)  # the inputs are what the op takes


# ---- compute-sanitizer: the command, and its verdict read back -------------------------------------------------
def test_sanitizer_command_and_verdict(tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text('#!/bin/sh\necho "$@" > "$0.$2"\necho "sanitizer target: ok"\n')
    fake.chmod(0o755)
    for tool in kernel_checks.SANITIZER_TOOLS:
        result = subprocess.run(
            kernel_checks.sanitizer_command(str(fake), tool, 3), capture_output=True, text=True, check=False
        )
        assert kernel_checks.sanitizer_passed(result.returncode, result.stdout.splitlines())
    args = (tmp_path / "compute-sanitizer.racecheck").read_text().split()
    assert args[:6] == ["--tool", "racecheck", "--kernel-name", "kns=crd_", "--error-exitcode", "9"]
    assert args[-3:] == [str(kernel_checks.SANITIZER_TARGET), "--seed", "3"]
    assert kernel_checks.SANITIZER_TARGET.is_file()
    assert not kernel_checks.sanitizer_passed(9, ["========= Invalid __global__ read", "sanitizer target: ok"])
    assert not kernel_checks.sanitizer_passed(0, ["Traceback (most recent call last):"])  # the target did not finish


# ---- the build -------------------------------------------------------------------------------------------------
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
