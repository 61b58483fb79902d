"""CUDA dispatch without a GPU: device properties, compile failures, probes and streams are faked.

Covers the fallback order native -> CuPy -> reference (one warning, never raising), the capability rules
(sm_75, PTX), the per-(op, device) cache of decisions, ``backends()``, the one CUDA path of the registry (operands
handed to the launchers, reference fallbacks) and the stream rules of the device caches (crd_fast/ops/streams.py).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import crd_fast
from crd_fast.core.embedding import embed_patches, patch_matrix
from crd_fast.ops import (
    cuda_dispatch,
    cuda_launch,
    cupy_jit,
    head_op,
    kernel_config,
    plan,
    reference,
    registry,
    residual_op,
    streams,
)
from crd_fast.ops.operands import Operands
from crd_fast.ops.plan import FOLDS, Geometry, fold_matrix, folded_operands

ROOT = Path(__file__).resolve().parents[1]
HEAD, RESIDUAL = head_op.SPEC, residual_op.SPEC


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    monkeypatch.delenv(cuda_dispatch.BACKEND_ENV, raising=False)
    cuda_dispatch.reset()
    FOLDS.clear()
    plan._TABLES.clear()
    yield
    cuda_dispatch.reset()
    FOLDS.clear()
    plan._TABLES.clear()


def fake_device(monkeypatch, cap=(8, 0), native=None, cupy=None, probe=None, capturing=False, native_residual=None):
    """A fake CUDA device 0 of capability ``cap``; ``native`` / ``cupy`` / ``probe``: problems (None = fine).

    ``native_residual`` is the native problem of the residual kernels alone (a build from before them). Probes are
    recorded as "<path>" for crd_head and "residual:<path>" for crd_residual, and read their problems from
    ``probe`` under that key.
    """
    probes = []
    monkeypatch.setattr(cuda_dispatch, "device_index", lambda device: 0)
    monkeypatch.setattr(cuda_dispatch, "capability", lambda index: cap)
    monkeypatch.setattr(cuda_dispatch, "device_name", lambda index: "Fake GPU")
    monkeypatch.setattr(cuda_dispatch.streams, "capturing", lambda device: capturing)

    def native_problem(kernels, c):
        return native if native is not None or kernels is not residual_op.KERNELS else native_residual

    monkeypatch.setattr(cuda_dispatch, "native_problem", native_problem)
    monkeypatch.setattr(cuda_dispatch, "cupy_problem", lambda index: cupy)

    def fake_probe(spec, path, device):
        key = path if spec is HEAD else f"residual:{path}"
        probes.append(key)
        return (probe or {}).get(key)

    monkeypatch.setattr(cuda_dispatch, "probe", fake_probe)
    return probes


def decide_recording(op=HEAD):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = cuda_dispatch.decide(op, torch.device("cuda", 0))
    return choice, [w for w in caught if issubclass(w.category, RuntimeWarning)]


# ---- the fallback order ----------------------------------------------------------------------------------
def test_native_is_used_when_it_passes_its_probe(monkeypatch):
    probes = fake_device(monkeypatch)
    choice, warned = decide_recording()
    assert (choice.path, choice.skipped, warned, probes) == ("native", {}, [], ["native"])
    assert choice.capability == (8, 0)


def test_failed_paths_fall_back_to_the_reference_with_one_warning(monkeypatch):
    probes = fake_device(
        monkeypatch,
        cupy=("NVRTC build failed: CompileException: cannot open source file crt/mma.h", False),
        probe={"native": "probe launch failed: RuntimeError: no kernel image is available"},
    )
    choice, warned = decide_recording()
    assert choice.path == "reference" and probes == ["native"]
    assert set(choice.skipped) == {"native", "cupy"}
    assert len(warned) == 1
    message = str(warned[0].message)
    assert "uses the reference path of crd_head" in message and "no kernel image" in message and "crt/mma.h" in message
    # decided once per device: no second probe, no second warning
    again, warned_again = decide_recording()
    assert again is choice and warned_again == [] and probes == ["native"]


def test_cupy_takes_over_when_native_has_no_image_for_the_device(monkeypatch):
    fake_device(monkeypatch, cap=(7, 5), native=("_C carries code for 80-real, none runs on sm_75", False))
    choice, warned = decide_recording()
    assert choice.path == "cupy" and "sm_75" in choice.skipped["native"]
    assert len(warned) == 1 and "uses the cupy path" in str(warned[0].message)


def test_absent_paths_fall_through_quietly(monkeypatch):
    """A CPU-only wheel with the CuPy extra is a normal install: CuPy, no warning."""
    fake_device(monkeypatch, native=("crd_fast.ops._C has no CUDA kernels", True))
    choice, warned = decide_recording()
    assert choice.path == "cupy" and warned == []
    cuda_dispatch.reset()
    fake_device(monkeypatch, native=("no kernels", True), cupy=("cupy is not installed", True))
    choice, warned = decide_recording()
    assert choice.path == "reference" and len(warned) == 1  # ending on the reference is always said


def test_devices_below_sm75_take_the_reference(monkeypatch):
    probes = fake_device(monkeypatch, cap=(6, 1))
    choice, warned = decide_recording()
    assert choice.path == "reference" and probes == []
    assert "below the oldest supported sm_75" in choice.skipped["native"]
    assert set(choice.skipped) == {b.name for b in cuda_dispatch.BACKENDS}
    assert len(warned) == 1


def test_inside_capture_the_choice_is_static_and_not_cached(monkeypatch):
    probes = fake_device(monkeypatch, capturing=True)
    choice, _ = decide_recording()
    assert choice.path == "native" and probes == [] and "capture" in choice.reason
    assert cuda_dispatch.CHOICES.get("crd_head", 0) is None
    # no NVRTC compile while capturing either: CuPy is judged by being installed
    fake_device(monkeypatch, capturing=True, native=("no kernels", True))
    monkeypatch.setattr(cuda_dispatch, "cupy_problem", lambda index: pytest.fail("no compile inside capture"))
    monkeypatch.setattr(cuda_dispatch.cupy_jit, "available", lambda: True)
    choice, _ = decide_recording()
    assert choice.path == "cupy" and cuda_dispatch.CHOICES.get("crd_head", 0) is None
    monkeypatch.setattr(cuda_dispatch.cupy_jit, "available", lambda: False)
    choice, _ = decide_recording()
    assert choice.path == "reference" and cuda_dispatch.CHOICES.get("crd_head", 0) is None


def test_forced_path(monkeypatch):
    fake_device(monkeypatch)
    monkeypatch.setenv(cuda_dispatch.BACKEND_ENV, "cupy")
    assert cuda_dispatch.decide(HEAD, torch.device("cuda", 0)).path == "cupy"
    assert cuda_dispatch.decide(RESIDUAL, torch.device("cuda", 0)).path == "cupy"
    monkeypatch.setenv(cuda_dispatch.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="CRD_FAST_CUDA_BACKEND must be one of"):
        cuda_dispatch.decide(HEAD, torch.device("cuda", 0))


def test_every_backend_is_a_launcher_of_every_op_and_a_path():
    """The registry and the backends agree: each op has one launcher per backend, each a path of the env var."""
    names = [b.name for b in cuda_dispatch.BACKENDS]
    assert names == ["native", "cupy"] and cuda_dispatch.PATHS == ("native", "cupy", "reference")
    assert list(registry.OPS) == ["crd_head", "crd_residual"]
    for spec in registry.OPS.values():
        assert list(spec.launchers) == names
        assert [f.__name__ for f in spec.launchers.values()] == [f"{spec.name}_{n}" for n in names]


# ---- each op decides on its own -----------------------------------------------------------------------------
def test_residual_op_has_its_own_probe_cache_and_warning(monkeypatch):
    probes = fake_device(monkeypatch, probe={"residual:native": "probe result differs from the reference (1e-01)"})
    head, warned = decide_recording()
    assert head.path == "native" and warned == [] and probes == ["native"]
    residual, warned = decide_recording(RESIDUAL)
    assert residual.path == "cupy" and probes == ["native", "residual:native", "residual:cupy"]
    assert "differs from the reference" in residual.skipped["native"]
    assert len(warned) == 1 and "uses the cupy path of crd_residual" in str(warned[0].message)
    assert cuda_dispatch.CHOICES.get("crd_head", 0) is head
    assert cuda_dispatch.CHOICES.get("crd_residual", 0) is residual
    again, warned = decide_recording(RESIDUAL)  # cached per (op, device): no probe, no warning
    assert again is residual and warned == [] and len(probes) == 3


def test_residual_op_falls_back_to_the_reference_alone(monkeypatch):
    fake_device(monkeypatch, probe={"residual:native": "probe launch failed", "residual:cupy": "probe launch failed"})
    residual, warned = decide_recording(RESIDUAL)
    assert residual.path == "reference" and set(residual.skipped) == {"native", "cupy"}
    assert len(warned) == 1 and "uses the reference path of crd_residual" in str(warned[0].message)
    assert decide_recording()[0].path == "native"  # the head keeps its kernels


def test_a_build_without_residual_kernels_is_absent_for_the_residual_op_only(monkeypatch):
    probes = fake_device(monkeypatch, native_residual=("_C was built before the crd_residual kernels", True))
    residual, warned = decide_recording(RESIDUAL)
    assert residual.path == "cupy" and warned == [] and probes == ["residual:cupy"]  # absent: quiet, no probe
    assert "before the crd_residual kernels" in residual.skipped["native"]
    assert decide_recording()[0].path == "native"


def test_native_problem_reads_the_ops_kernels_in_the_build(monkeypatch):
    """A CUDA build from before an op's kernels lacks its entry point: absent for that op only."""
    monkeypatch.setattr(cuda_dispatch.native, "has_native_cuda", lambda: True)
    monkeypatch.setattr(cuda_dispatch.native, "cuda_archs", lambda: None)
    monkeypatch.setattr(cuda_dispatch.native, "compiled", lambda: type("C", (), {"crd_head_cuda": None})())
    assert cuda_dispatch.native_problem(residual_op.KERNELS, (8, 0)) == (
        "crd_fast.ops._C was built before the crd_residual kernels (rebuild it)",
        True,
    )
    assert cuda_dispatch.native_problem(head_op.KERNELS, (8, 0)) is None
    assert not cuda_launch.has_compiled(residual_op.KERNELS) and cuda_launch.has_compiled(head_op.KERNELS)
    with pytest.raises(RuntimeError, match="built before the CUDA crd_residual kernels"):
        RESIDUAL.launchers["native"](None)  # refused before the operands are even looked at
    monkeypatch.setattr(cuda_dispatch.native, "compiled", lambda: type("C", (), {"crd_residual_cuda": None})())
    assert cuda_dispatch.native_problem(residual_op.KERNELS, (8, 0)) is None
    monkeypatch.setattr(cuda_dispatch.native, "has_native_cuda", lambda: False)  # no CUDA at all: said so first
    assert cuda_dispatch.native_problem(residual_op.KERNELS, (8, 0))[1] is True
    assert "no CUDA kernels" in cuda_dispatch.native_problem(residual_op.KERNELS, (8, 0))[0]


def test_residual_decision_inside_capture(monkeypatch):
    probes = fake_device(monkeypatch, capturing=True, native_residual=("old build", True))
    monkeypatch.setattr(cuda_dispatch.cupy_jit, "available", lambda: True)
    choice, _ = decide_recording(RESIDUAL)
    assert choice.path == "cupy" and probes == [] and cuda_dispatch.CHOICES.get("crd_residual", 0) is None


def _exact_residual(ops, out=None, partial=None):
    """What the residual kernels compute from their operands, in float64."""
    emb = patch_matrix(embed_patches([m.double() for m in ops.maps]))
    b, h, w, r = residual_op.KERNELS.out_shape_of(ops)
    rows = (emb @ ops.matrix.double().T).reshape(b, h * w, r) - ops.q.double()
    return rows.reshape(b, h, w, r)


def test_residual_probe_reports_wrong_results_and_launch_errors(monkeypatch):
    """The residual probe runs the real cuda_operands() on CPU tensors with the launch faked."""
    launchers = RESIDUAL.launchers
    monkeypatch.setitem(launchers, "native", _exact_residual)
    assert cuda_dispatch.probe(RESIDUAL, "native", torch.device("cpu")) is None
    monkeypatch.setitem(launchers, "native", lambda ops: _exact_residual(ops) + 0.01)
    assert "differs from the reference" in cuda_dispatch.probe(RESIDUAL, "native", torch.device("cpu"))
    monkeypatch.setitem(launchers, "native", lambda ops: _exact_residual(ops)[:, :, :, :2])
    assert "has shape" in cuda_dispatch.probe(RESIDUAL, "native", torch.device("cpu"))

    def no_image(ops):
        raise RuntimeError("crd_fast CUDA error in crd_residual tile launch: no kernel image is available")

    monkeypatch.setitem(launchers, "cupy", no_image)
    assert "no kernel image" in cuda_dispatch.probe(RESIDUAL, "cupy", torch.device("cpu"))


@pytest.mark.parametrize(
    "archs,cap,want",
    [
        (("75-real", "80-real", "86-real", "89-real", "90"), (7, 5), True),
        (("80-real", "86-real", "89-real", "90"), (7, 5), False),  # the old default: no T4 image
        (("80-real", "90"), (8, 6), True),  # sm_80 SASS runs on 8.6
        (("86-real", "90"), (8, 0), False),  # but not the other way round
        (("80-real", "90"), (12, 0), True),  # PTX of 90 is JIT-compiled for newer devices
        (("80-real", "90-virtual"), (9, 0), True),
        (("80-real", "86-real"), (9, 0), False),
        (("native",), (8, 0), None),
        (None, (8, 0), None),
    ],
)
def test_kernel_image_rules(archs, cap, want):
    assert cuda_dispatch.image_for(archs, cap) is want


def test_native_problem_reads_the_build(monkeypatch):
    monkeypatch.setattr(cuda_dispatch.native, "has_native_cuda", lambda: True)
    monkeypatch.setattr(cuda_dispatch.native, "cuda_archs", lambda: ("80-real", "90"))
    monkeypatch.setattr(cuda_dispatch.native, "compiled", lambda: type("C", (), {"crd_head_cuda": None})())
    assert "none runs on sm_75" in cuda_dispatch.native_problem(head_op.KERNELS, (7, 5))[0]
    assert cuda_dispatch.native_problem(head_op.KERNELS, (8, 9)) is None
    monkeypatch.setattr(cuda_dispatch.native, "has_native_cuda", lambda: False)
    assert cuda_dispatch.native_problem(head_op.KERNELS, (8, 0))[1] is True  # absent, not failed


# ---- CuPy: available means "compiles" -------------------------------------------------------------------
def test_cupy_compile_failure_makes_the_path_unavailable(monkeypatch):
    calls = []

    def broken(index):
        calls.append(index)
        raise RuntimeError('CompileException: catastrophic error: cannot open source file "crt/mma.h"')

    monkeypatch.setattr(cupy_jit, "cupy_importable", lambda: True)
    monkeypatch.setattr(cupy_jit, "build_module", broken)
    assert "crt/mma.h" in cupy_jit.compile_error(0)
    assert "crt/mma.h" in cupy_jit.compile_error(0) and calls == [0]  # compiled (and failed) once
    problem = cuda_dispatch.cupy_problem(0)
    assert problem[1] is False and "NVRTC build failed" in problem[0]
    with pytest.raises(RuntimeError, match="CuPy build of the kernels failed"):
        cupy_jit._module(0)
    monkeypatch.setattr(cupy_jit, "cupy_importable", lambda: False)
    assert cuda_dispatch.cupy_problem(0) == ("cupy is not installed (pip install crd-fast[cupy])", True)


# ---- the probe --------------------------------------------------------------------------------------------
def _exact_head(ops, out=None, partial=None):
    """What the head kernels compute from their operands, in float64."""
    emb = patch_matrix(embed_patches([m.double() for m in ops.maps]))
    scores = torch.linalg.vector_norm(emb @ ops.matrix.double().T - ops.q.double(), dim=1)
    return scores.reshape(head_op.KERNELS.out_shape_of(ops))


def test_probe_reports_wrong_results_and_launch_errors(monkeypatch):
    """The probe runs the real cuda_operands() on CPU tensors with the launch faked: right, wrong, raising."""
    launchers = HEAD.launchers
    monkeypatch.setitem(launchers, "native", _exact_head)
    assert cuda_dispatch.probe(HEAD, "native", torch.device("cpu")) is None
    monkeypatch.setitem(launchers, "native", lambda ops: _exact_head(ops) * 1.01)
    assert "differs from the reference" in cuda_dispatch.probe(HEAD, "native", torch.device("cpu"))
    monkeypatch.setitem(launchers, "native", lambda ops: _exact_head(ops) * float("nan"))
    assert "differs from the reference" in cuda_dispatch.probe(HEAD, "native", torch.device("cpu"))

    def no_image(ops):
        raise RuntimeError("crd_fast CUDA error in crd_head tile launch: no kernel image is available")

    monkeypatch.setitem(launchers, "cupy", no_image)
    assert "no kernel image" in cuda_dispatch.probe(HEAD, "cupy", torch.device("cpu"))


# ---- backends() -------------------------------------------------------------------------------------------
def test_backends_reports_each_device(monkeypatch):
    fake_device(monkeypatch, probe={"native": "probe launch failed: no kernel image"})
    monkeypatch.setattr(cuda_dispatch, "device_index", lambda device: torch.device(device).index)
    monkeypatch.setattr(cuda_dispatch, "capability", lambda index: [(8, 0), (6, 0)][index])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = crd_fast.backends()["cuda_devices"]
    assert [d["path"] for d in report] == ["cupy", "reference"]
    assert [d["crd_residual"]["path"] for d in report] == ["native", "reference"]
    assert report[0]["capability"] == "8.0" and "no kernel image" in report[0]["skipped"]["native"]
    assert report[1]["capability"] == "6.0" and "sm_60" in report[1]["skipped"]["cupy"]


# ---- the registry's one CUDA path, run on CPU tensors with the decision and launch faked --------------------
def _decided(path, op, cap=(8, 0)):
    """A fake cuda_dispatch.decide that insists on being asked for ``op``."""

    def decide(spec, device):
        assert spec is op, f"{spec.name} decides under its own name, not {op.name}'s"
        return cuda_dispatch.Choice(path, "test", capability=cap)

    return decide


@pytest.mark.parametrize(
    "dtype,cap,operand,acc",
    [
        (torch.float32, (8, 0), torch.float32, torch.float32),
        (torch.float64, (8, 0), torch.float64, torch.float64),
        (torch.bfloat16, (8, 0), torch.bfloat16, torch.float32),
        (torch.float16, (8, 0), torch.float16, torch.float32),
        (torch.bfloat16, (7, 5), torch.float32, torch.float32),
        (torch.float16, (7, 5), torch.float16, torch.float32),
    ],
)
def test_cuda_kernel_hands_one_operand_object_to_the_launcher(monkeypatch, dtype, cap, operand, acc):
    """Everything up to the pointer hand-off: operands laid out as the kernels expect, bf16 widened below sm_80."""
    gen = torch.Generator().manual_seed(41)
    maps = [torch.randn(2, c, s, s, generator=gen, dtype=torch.float64).to(dtype) for c, s in ((6, 6), (10, 3), (4, 1))]
    matrix = torch.randn(9, 9, generator=gen, dtype=torch.float64)
    offset = torch.randn(9, generator=gen, dtype=torch.float64)
    seen = {}

    def fake_run(operands, out=None, partial=None):
        seen["ops"] = operands
        return head_op.KERNELS.new_out(operands).zero_()

    monkeypatch.setattr(cuda_dispatch, "decide", _decided("cupy", HEAD, cap))
    monkeypatch.setitem(HEAD.launchers, "cupy", fake_run)
    monkeypatch.setitem(HEAD.launchers, "native", lambda *a, **k: pytest.fail("the decided path runs, no other"))
    got = registry.cuda_kernel(HEAD, maps, matrix, offset, "patchcore", 9)
    o = seen["ops"]
    assert got.dtype == acc and got.shape == (2, 6, 6)
    assert all(m.dtype == operand and m.is_contiguous() for m in o.maps)
    assert o.matrix.dtype == operand and o.matrix.shape == (9, 20) and o.q.dtype == acc and o.weights.dtype == acc
    assert o.plan.dtype == torch.int32 and o.plan.shape == (3 * 4 + 3 * (6 + 6) * 2,)
    assert head_op.KERNELS.new_partial(o).shape == (1, 2 * 36) and o.sizes == (2, 6, 6, 20, 9)
    if dtype == torch.float64:  # the folded operands reproduce the reference scores
        p, q = fold_matrix(matrix, offset, (6, 10, 4), "patchcore", 9)
        emb = patch_matrix(embed_patches(maps, "concat"))
        want = reference.crd_head(maps, matrix, offset, "patchcore", 9).flatten()
        torch.testing.assert_close(torch.linalg.vector_norm(emb @ p.T - q, dim=1), want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("op", [HEAD, RESIDUAL], ids=lambda s: s.name)
def test_cuda_kernel_takes_the_reference_when_decided_or_too_many_layers(monkeypatch, op):
    gen = torch.Generator().manual_seed(43)
    layers = kernel_config.CONFIG.max_layers + 1
    maps = [torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(layers)]
    matrix = torch.randn(5, 3 * layers, generator=gen, dtype=torch.float64)
    second = torch.zeros(3 * layers, dtype=torch.float64) if op is HEAD else torch.randn(16, 5, generator=gen)
    for path in op.launchers:
        monkeypatch.setitem(op.launchers, path, lambda *a, **k: pytest.fail("no kernel may run"))
    monkeypatch.setattr(cuda_dispatch, "decide", _decided("native", op))
    want = op.reference(maps, matrix, second, "concat", 1)
    torch.testing.assert_close(registry.cuda_kernel(op, maps, matrix, second, "concat", 1), want, rtol=1e-12, atol=0)
    monkeypatch.setattr(cuda_dispatch, "decide", _decided("reference", op))
    second2 = second[:6] if op is HEAD else second
    torch.testing.assert_close(
        registry.cuda_kernel(op, maps[:2], matrix[:, :6], second2, "concat", 1),
        op.reference(maps[:2], matrix[:, :6], second2, "concat", 1),
        rtol=1e-12,
        atol=0,
    )
    bad = second[:5] if op is HEAD else second[:15]
    with pytest.raises(ValueError, match=r"offset must have shape|q must be \(P, r\)"):  # the op's checks run first
        registry.cuda_kernel(op, maps[:2], matrix[:, :6], bad, "concat", 1)


@pytest.mark.parametrize(
    "dtype,cap,operand,acc",
    [
        (torch.float32, (8, 0), torch.float32, torch.float32),
        (torch.float64, (8, 0), torch.float64, torch.float64),
        (torch.bfloat16, (8, 0), torch.bfloat16, torch.float32),
        (torch.float16, (8, 0), torch.float16, torch.float32),
        (torch.bfloat16, (7, 5), torch.float32, torch.float32),
    ],
)
def test_residual_cuda_kernel_hands_its_operands_to_the_launcher(monkeypatch, dtype, cap, operand, acc):
    """crd_residual's CUDA kernel up to the pointer hand-off: folded matrix, (P, r) q, tables; bf16 widened."""
    gen = torch.Generator().manual_seed(53)
    specs = ((6, 7, 5), (10, 3, 3))
    maps = [torch.randn(2, c, h, w, generator=gen, dtype=torch.float64).to(dtype) for c, h, w in specs]
    matrix = torch.randn(9, 9, generator=gen, dtype=torch.float64)
    q = torch.randn(35, 9, generator=gen, dtype=torch.float64)
    seen = {}

    def fake_run(operands, out=None, partial=None):
        seen["ops"] = operands
        return _exact_residual(operands).to(operands.acc_dtype)

    monkeypatch.setattr(cuda_dispatch, "decide", _decided("native", RESIDUAL, cap))
    monkeypatch.setitem(RESIDUAL.launchers, "native", fake_run)
    got = registry.cuda_kernel(RESIDUAL, maps, matrix, q, "patchcore", 9)
    o = seen["ops"]
    assert got.dtype == acc and got.shape == (2, 7, 5, 9)
    assert all(m.dtype == operand and m.is_contiguous() for m in o.maps)
    assert o.matrix.dtype == operand and o.matrix.shape == (9, 16) and o.q.dtype == acc and o.q.shape == (35, 9)
    assert o.weights.dtype == acc and o.plan.dtype == torch.int32
    assert residual_op.KERNELS.out_shape_of(o) == (2, 7, 5, 9) and residual_op.KERNELS.new_partial(o) is None
    assert residual_op.KERNELS.new_out(o).shape == (2, 7, 5, 9) and residual_op.KERNELS.new_out(o).dtype == acc
    if dtype == torch.float64:  # the folded operands reproduce the reference residuals
        want = reference.crd_residual(maps, matrix, q, "patchcore", 9)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        p, _ = fold_matrix(matrix, torch.zeros(9, dtype=torch.float64), (6, 10), "patchcore", 9)
        torch.testing.assert_close(o.matrix, p, rtol=0, atol=0)
    # the folded matrix and q are cached per (matrix, q) pair: a second call reuses them
    registry.cuda_kernel(RESIDUAL, maps, matrix, q, "patchcore", 9)
    assert seen["ops"].matrix is o.matrix and seen["ops"].q is o.q


@pytest.mark.parametrize("op", [HEAD, RESIDUAL], ids=lambda s: s.name)
def test_first_call_inside_capture_records_the_reference_once(monkeypatch, op):
    gen = torch.Generator().manual_seed(47)
    maps = [torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)]
    matrix = torch.randn(4, 5, generator=gen)
    second = torch.randn(5, generator=gen) if op is HEAD else torch.randn(25, 4, generator=gen)
    monkeypatch.setattr(cuda_dispatch, "decide", _decided("native", op))
    monkeypatch.setitem(op.launchers, "native", lambda *a, **k: pytest.fail("nothing is prepared: no kernel may run"))
    monkeypatch.setattr(streams, "capturing", lambda device: True)
    monkeypatch.setattr(registry, "WARNED", set())
    with pytest.warns(RuntimeWarning, match="inside CUDA-graph capture"):
        got = registry.cuda_kernel(op, maps, matrix, second, "concat", 1)
    want = op.reference(maps, matrix, second, "concat", 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.cuda_kernel(op, maps, matrix, second, "concat", 1)  # warned once only


# ---- stream rules of the device caches -------------------------------------------------------------------
class FakeStreams:
    """A CUDA device faked on CPU tensors: a current stream id, synchronizations and record_stream calls."""

    def __init__(self, monkeypatch):
        self.current, self.synced, self.recorded, self.capture = 1, [], [], False
        monkeypatch.setattr(streams, "is_cuda", lambda device: True)
        monkeypatch.setattr(streams, "stream_id", lambda device: self.current)
        monkeypatch.setattr(streams, "capturing", lambda device: self.capture)
        monkeypatch.setattr(streams, "synchronize", lambda device: self.synced.append(self.current))
        monkeypatch.setattr(streams, "record", lambda t, device: self.recorded.append((id(t), self.current)))


def test_table_cache_is_complete_when_made_and_kept_alive_for_other_streams(monkeypatch):
    fake = FakeStreams(monkeypatch)
    geom = Geometry(channels=(3, 2), sizes=((5, 4), (3, 3)), batch=1)
    cpu = torch.device("cpu")
    first = plan.tables(geom, torch.float32, cpu)
    assert fake.synced == [1] and fake.recorded == []  # made on stream 1, synchronized once
    assert plan.tables(geom, torch.float32, cpu) is first and fake.synced == [1] and fake.recorded == []
    fake.current = 2
    assert plan.tables(geom, torch.float32, cpu) is first
    assert fake.recorded == [(id(first[0]), 2), (id(first[1]), 2)] and fake.synced == [1]
    fake.capture = True  # a hit inside capture is fine; a miss is refused (no pageable copy while capturing)
    plan.tables(geom, torch.float32, cpu)
    with pytest.raises(streams.NotPrepared, match="plan tables"):
        plan.tables(Geometry(channels=(3,), sizes=((2, 2),), batch=1), torch.float32, cpu)


def test_fold_cache_follows_the_same_stream_rules(monkeypatch):
    fake = FakeStreams(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    matrix, offset = torch.randn(4, 6, generator=gen), torch.randn(6, generator=gen)
    args = (matrix, offset, (2, 4), "concat", 1, torch.float32, torch.float32)
    p, _ = folded_operands(*args)
    assert fake.synced == [1]
    fake.current = 3
    assert folded_operands(*args)[0] is p and {s for _, s in fake.recorded} == {3} and len(fake.recorded) == 2
    fake.capture = True
    matrix.mul_(2)  # a new version: the cached entry no longer matches, and capture refuses a new one
    with pytest.raises(streams.NotPrepared, match="folded matrix"):
        folded_operands(*args)


def test_cpu_tensors_never_touch_streams(monkeypatch):
    monkeypatch.setattr(streams, "synchronize", lambda device: pytest.fail("no stream on the CPU"))
    monkeypatch.setattr(streams, "record", lambda t, device: pytest.fail("no stream on the CPU"))
    geom = Geometry(channels=(3,), sizes=((4, 4),), batch=1)
    plan.tables(geom, torch.float64, torch.device("cpu"))
    plan.tables(geom, torch.float64, torch.device("cpu"))


# ---- facts written once -----------------------------------------------------------------------------------
def test_launch_geometry_is_read_from_the_shipped_kernel_source():
    text = kernel_config.source_text()
    cfg = kernel_config.CONFIG
    written = dict(re.findall(r"constexpr int (k\w+) = (\d+);", text))
    assert cfg.tile_r == int(written["kTileR"]) and cfg.tile_p == int(written["kTileP"])
    assert cfg.threads == int(written["kThreads"]) and cfg.max_layers == int(written["kMaxLayers"])
    assert cfg.finish_threads == int(written["kFinishThreads"])
    assert cfg.bf16_min_arch * 10 == int(written["kBf16MinArch"])
    assert cfg.max_taps == plan.MAX_TAPS and cfg.tiles(65) == 2 and cfg.tiles(64) == 1 and cfg.tiles(0) == 0
    assert "#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < " + written["kBf16MinArch"] in text
    pyx = (ROOT / "csrc" / "cpu" / "crd_head.pyx").read_text()  # the CPU pass reads the same plan tables
    assert re.search(rf"MAX_TAPS = {cfg.max_taps}\b", pyx)
    common = (ROOT / "csrc" / "common.h").read_text()
    assert f"constexpr int kHeadMaxLayers = {cfg.max_layers};" in common
    with pytest.raises(ValueError, match="kTileR"):
        kernel_config.parse(text.replace("kTileR = ", "kTileRows = "))


def test_codegen_flags_and_architectures_agree_between_nvcc_and_nvrtc():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for flag in cupy_jit.CODEGEN_FLAGS:
        assert flag in cmake, f"{flag} is passed to NVRTC but not to nvcc"
    assert "-ftz=true" in cupy_jit.CODEGEN_FLAGS  # CuPy always adds it: nvcc must match
    assert set(cupy_jit.CODEGEN_FLAGS) <= set(cupy_jit.nvrtc_options())
    archs = re.search(r'set\(CMAKE_CUDA_ARCHITECTURES "([^"]+)"\)', cmake).group(1).split(";")
    cap = cuda_dispatch.MIN_CAPABILITY
    assert cuda_dispatch.image_for(tuple(archs), cap) is True  # the oldest supported device has an image


def test_launch_check_refuses_bf16_operands_below_sm80(monkeypatch):
    """The bf16 entry traps below sm_80; a direct launch with bf16 operands there is refused before any pointer."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with FakeTensorMode():
        maps = (torch.empty(1, 3, 4, 4, device="cuda", dtype=torch.bfloat16),)
        plan_t, weights = torch.empty(4 + 16, device="cuda", dtype=torch.int32), torch.empty(32, device="cuda")
        matrix = torch.empty(2, 3, device="cuda", dtype=torch.bfloat16)
        ops = Operands(maps, plan_t, weights, matrix, torch.empty(2, device="cuda"))
        kernels = head_op.KERNELS
        with pytest.raises(ValueError, match="bfloat16 kernels need sm_80"):
            cuda_launch.check_launch(kernels, ops, kernels.new_out(ops), kernels.new_partial(ops))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert cuda_launch.check_launch(kernels, ops, kernels.new_out(ops), kernels.new_partial(ops)) == "bfloat16"
