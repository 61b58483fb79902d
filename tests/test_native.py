"""The fused-head kernels below the op: plan tables, the Cython pass, CUDA argument checks, the shipped
CUDA source (NVRTC and nvcc builds, no spills). The CUDA kernels on a GPU are tested in tests/gpu/."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from crd_fast.core.dtypes import compute_dtype
from crd_fast.core.embedding import (
    embed_patches,
    patch_matrix,
    pool_feature_map,
    resize_to,
)
from crd_fast.ops import cpu, cuda_launch, cupy_jit, head_op, kernel_config, native, residual_op
from crd_fast.ops.operands import DTYPE_NAMES, Operands
from crd_fast.ops.plan import MAX_TAPS, Geometry, axis_matrix, axis_taps, build_tables

needs_fused_cpu = pytest.mark.skipif(not cpu.available(), reason=f"CPU fused pass not built: {cpu.import_error()}")
ENTRIES = [
    "crd_head_tile_f32",
    "crd_head_tile_f64",
    "crd_head_tile_f16",
    "crd_head_tile_bf16",
    "crd_residual_tile_f32",
    "crd_residual_tile_f64",
    "crd_residual_tile_f16",
    "crd_residual_tile_bf16",
    "crd_head_finish_f32",
    "crd_head_finish_f64",
]


def test_expected_builds_are_present():
    """scripts/test.sh sets these: a build that silently lost a kernel fails here instead of skipping."""
    if not os.environ.get("CRD_FAST_EXPECT_NATIVE") and not os.environ.get("CRD_FAST_EXPECT_CUDA_KERNELS"):
        pytest.skip("CRD_FAST_EXPECT_NATIVE and CRD_FAST_EXPECT_CUDA_KERNELS are unset: no expected build to check")
    if os.environ.get("CRD_FAST_EXPECT_NATIVE"):
        assert cpu.available(), cpu.import_error()
        assert cpu.bf16_pass_available(), "the fused pass was built without its bf16 pass"
    expect_cuda = os.environ.get("CRD_FAST_EXPECT_CUDA_KERNELS")
    if expect_cuda == "1":
        assert native.has_native_cuda() and hasattr(native._C, "crd_head_cuda")
        assert all(cuda_launch.has_compiled(spec.kernels) for spec in (head_op.SPEC, residual_op.SPEC))
    elif expect_cuda == "0":  # the CPU-only build (CRD_FAST_CUDA=OFF)
        assert not native.has_native_cuda() and not hasattr(native._C, "crd_head_cuda")
        assert not any(cuda_launch.has_compiled(spec.kernels) for spec in (head_op.SPEC, residual_op.SPEC))


# ---- plan tables ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_src,n_out", [(1, 1), (1, 5), (2, 7), (14, 28), (28, 28), (5, 3), (13, 5), (7, 9), (3, 1)])
def test_axis_tables_reproduce_pool_and_resize(n_src, n_out):
    gen = torch.Generator().manual_seed(n_src * 100 + n_out)
    fmap = torch.randn(2, 3, n_src, n_src + 2, generator=gen, dtype=torch.float64)
    want = resize_to(pool_feature_map(fmap), (n_out, n_src + 4))
    got = torch.einsum("oi,pj,bcij->bcop", axis_matrix(n_src, n_out), axis_matrix(n_src + 2, n_src + 4), fmap)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    idx, w = axis_taps(n_src, n_out)
    dense = torch.zeros(n_out, n_src, dtype=torch.float64)
    for o in range(n_out):
        start, count = int(idx[o, 0]), int(idx[o, 1])
        assert 1 <= count <= MAX_TAPS and 0 <= start and start + count <= n_src
        assert torch.all(w[o, count:] == 0)
        dense[o, start : start + count] = w[o, :count]
    torch.testing.assert_close(dense, axis_matrix(n_src, n_out), rtol=0, atol=0)


def test_plan_layout():
    geom = Geometry(channels=(3, 5), sizes=((4, 6), (2, 3)), batch=1)
    plan, weights = build_tables(geom)
    rows = 4 + 6
    assert plan.dtype == torch.int32 and plan.shape == (2 * 4 + 2 * rows * 2,)
    assert plan[:8].tolist() == [3, 4, 6, 0, 5, 2, 3, 3]
    assert weights.shape == (2 * rows * MAX_TAPS,)
    # layer 1, output row y = 0: taps on the 2-row map start at 0 (pool reaches the padding)
    taps1 = plan[8 + rows * 2 :].view(rows, 2)
    idx, _ = axis_taps(2, 4)
    assert taps1[:4].tolist() == idx.tolist()


# ---- the Cython pass ----------------------------------------------------------------------------------
def dense_pass(zs: list[torch.Tensor], sizes: list[tuple[int, int]], q: torch.Tensor) -> torch.Tensor:
    """What the fused pass computes, written with dense axis matrices: ||sum_l A_y Z_l A_x^T - q||."""
    h0, w0 = sizes[0]
    total = sum(
        torch.einsum("yi,xj,bijk->byxk", axis_matrix(h, h0), axis_matrix(w, w0), z.double())
        for z, (h, w) in zip(zs, sizes)
    )
    return torch.linalg.vector_norm(total - q.double(), dim=-1)


def _pointers(zs, plan, weights, q, out) -> tuple:
    """The fused passes' leading arguments: the projections' and tables' addresses, then q's and the output's."""
    return [z.data_ptr() for z in zs], plan.data_ptr(), weights.data_ptr(), q.data_ptr(), out.data_ptr()


@needs_fused_cpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_pass_matches_dense_formula(dtype, tol):
    gen = torch.Generator().manual_seed(17)
    sizes = [(9, 7), (4, 5), (12, 15), (1, 1)]
    batch, r = 3, 37
    zs = [torch.randn(batch, h, w, r, generator=gen, dtype=torch.float64).to(dtype) for h, w in sizes]
    q = torch.randn(r, generator=gen, dtype=torch.float64).to(dtype)
    geom = Geometry(channels=(1,) * len(sizes), sizes=tuple(sizes), batch=batch)
    plan, weights = build_tables(geom)
    weights = weights.to(dtype)
    want = dense_pass(zs, sizes, q)
    outs = []
    for threads in (1, 2):
        out = torch.full((batch, 9, 7), float("nan"), dtype=dtype)
        cpu._crd_head_cpu.fused_pass(
            str(dtype).split(".")[1], *_pointers(zs, plan, weights, q, out), batch, 9, 7, r, 15, threads
        )
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # one thread per output row: thread count never changes a bit


@needs_fused_cpu
def test_fused_pass_refuses_bad_arguments():
    with pytest.raises(TypeError, match="'float32' or 'float64'"):
        cpu._crd_head_cpu.fused_pass("float16", [0], 0, 0, 0, 0, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="num_threads"):
        cpu._crd_head_cpu.fused_pass("float32", [0], 0, 0, 0, 0, 1, 1, 1, 1, 1, 0)


needs_bf16_pass = pytest.mark.skipif(not cpu.bf16_pass_available(), reason="the bf16 pass is not built")


def _runnable_isas() -> list[str]:
    """The bf16 pass's compiled variants this processor runs (all up to the best one)."""
    if not cpu.bf16_pass_available():
        return []
    isas = list(cpu._crd_head_cpu.BF16_ISAS)
    return isas[: isas.index(cpu.bf16_isa()) + 1]


def _bf16_pass(zs, plan, weights, q, out, batch, h0, w0, r, max_w, threads, residual, isa):
    cpu._crd_head_cpu.fused_pass_bf16(
        *_pointers(zs, plan, weights, q, out), batch, h0, w0, r, max_w, threads, residual, isa
    )


@needs_bf16_pass
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("r", [37, 300])  # one channel block with a tail; three blocks, the last partial
def test_bf16_pass_matches_dense_formula(isa, r):
    """bfloat16 projections, float32 arithmetic: against the float64 formula on the same (widened) bf16 values,
    so float32 rounding is the only difference; every compiled variant this processor runs, 1 and 2 threads."""
    if isa not in _runnable_isas():
        pytest.skip(f"this processor does not run the {isa} variant (best: {cpu.bf16_isa()})")
    gen = torch.Generator().manual_seed(19 + r)
    sizes = [(9, 7), (4, 5), (12, 15), (1, 1)]
    batch = 3
    zs = [torch.randn(batch, h, w, r, generator=gen).bfloat16() for h, w in sizes]
    q = torch.randn(r, generator=gen)
    q_grid = torch.randn(9, 7, r, generator=gen)
    geom = Geometry(channels=(1,) * len(sizes), sizes=tuple(sizes), batch=batch)
    plan, weights = build_tables(geom)
    weights = weights.float()
    want = dense_pass(zs, sizes, q)
    # the residual pass's offsets are per position: dense_pass with q_grid broadcast, before the norm
    total = sum(
        torch.einsum("yi,xj,bijk->byxk", axis_matrix(h, 9), axis_matrix(w, 7), z.double())
        for z, (h, w) in zip(zs, sizes)
    )
    want_residual = total - q_grid.double()
    outs = []
    for threads in (1, 2):
        out = torch.full((batch, 9, 7), float("nan"))
        _bf16_pass(zs, plan, weights, q, out, batch, 9, 7, r, 15, threads, False, isa)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
        res = torch.full((batch, 9, 7, r), float("nan"))
        _bf16_pass(zs, plan, weights, q_grid, res, batch, 9, 7, r, 15, threads, True, isa)
        torch.testing.assert_close(res.double(), want_residual, rtol=1e-5, atol=1e-5)
        outs.append((out, res))
    # one thread per output row: the thread count never changes a bit
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_bf16_pass
def test_bf16_pass_refuses_bad_arguments():
    with pytest.raises(ValueError, match="isa must be 'auto' or one of"):
        cpu._crd_head_cpu.fused_pass_bf16([0], 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, False, "sse9")
    with pytest.raises(ValueError, match="num_threads"):
        cpu._crd_head_cpu.fused_pass_bf16([0], 0, 0, 0, 0, 1, 1, 1, 1, 1, 0)


@needs_fused_cpu
def test_fused_head_cpu_checks_and_fills_out():
    gen = torch.Generator().manual_seed(3)
    maps = [torch.randn(2, 4, 5, 6, generator=gen), torch.randn(2, 3, 3, 3, generator=gen)]
    matrix_t = torch.randn(7, 5, generator=gen)
    q = torch.randn(5, generator=gen)
    out = torch.full((2, 5, 6), float("nan"))
    assert cpu.fused_head_cpu(maps, matrix_t, q, out=out) is out and torch.isfinite(out).all()
    embed = patch_matrix(embed_patches([m.double() for m in maps]))
    want = torch.linalg.vector_norm(embed @ matrix_t.double() - q.double(), dim=1).reshape(2, 5, 6)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
    with pytest.raises(TypeError, match="float32 or float64"):
        cpu.fused_head_cpu([m.half() for m in maps], matrix_t, q)
    with pytest.raises(ValueError, match="matrix_t must be a contiguous"):
        cpu.fused_head_cpu(maps, torch.randn(5, 7).T, q)
    with pytest.raises(ValueError, match=r"matrix_t must be .* \(7, r\)"):
        cpu.fused_head_cpu(maps, matrix_t[:6], q)
    with pytest.raises(ValueError, match="q must be"):
        cpu.fused_head_cpu(maps, matrix_t, q.double())
    with pytest.raises(ValueError, match="out must be"):
        cpu.fused_head_cpu(maps, matrix_t, q, out=torch.empty(2, 6, 5))
    with pytest.raises(ValueError, match="feature map 1"):
        cpu.fused_head_cpu([maps[0], maps[1].double()], matrix_t, q)


def test_reference_fallback_without_compiled_kernels():
    """With neither _C nor the Cython module importable, the op still runs (the reference) and agrees."""
    code = (
        "import sys; sys.modules['crd_fast.ops._C'] = None; sys.modules['crd_fast.ops._crd_head_cpu'] = None\n"
        "import torch, crd_fast\n"
        "from crd_fast import ops\nfrom crd_fast.ops import reference\n"
        "from crd_fast.ops import cpu\n"
        "assert not cpu.available() and not crd_fast.backends()['fused_cpu']\n"
        "g = torch.Generator().manual_seed(0)\n"
        "maps = [torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 4, 3, 3, generator=g)]\n"
        "m, o = torch.randn(6, 7, generator=g), torch.randn(7, generator=g)\n"
        "got = ops.crd_head(maps, m, o)\n"
        "torch.testing.assert_close(got.double(), reference.crd_head(maps, m, o), rtol=1e-5, atol=0)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---- CUDA arguments, checked without a GPU (fake CUDA tensors) -------------------------------------------
def _launch_args(dtype=torch.float32, batch=2, r=70, device="cuda"):
    """(Operands, partial, out) of a 2-layer launch with a (6, 5) output grid."""
    maps = (
        torch.empty(batch, 4, 6, 5, device=device, dtype=dtype),
        torch.empty(batch, 3, 3, 3, device=device, dtype=dtype),
    )
    acc = compute_dtype(dtype)
    rows = 6 + 5
    ops = Operands(
        maps=maps,
        plan=torch.zeros(2 * 4 + 2 * rows * 2, device=device, dtype=torch.int32),
        weights=torch.zeros(2 * rows * 4, device=device, dtype=acc),
        matrix=torch.zeros(r, 7, device=device, dtype=dtype),
        q=torch.zeros(r, device=device, dtype=acc),
    )
    return ops, torch.empty(2, batch * 30, device=device, dtype=acc), torch.empty(batch, 6, 5, device=device, dtype=acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_argument_checks(dtype):
    head = head_op.KERNELS
    with FakeTensorMode():
        ops, partial, out = _launch_args(dtype)
        assert cuda_launch.check_launch(head, ops, out, partial) == DTYPE_NAMES[dtype]
        acc = compute_dtype(dtype)
        bad_ops = {
            "q": torch.empty(69, device="cuda", dtype=acc),
            "weights": torch.empty(88, device="cuda", dtype=torch.float16),
            "plan": torch.empty(52, device="cuda", dtype=torch.int64),
            "matrix": torch.empty(70, 8, device="cuda", dtype=dtype),
        }
        for name, value in bad_ops.items():
            with pytest.raises(ValueError, match=f"^{name}"):
                cuda_launch.check_launch(head, dataclasses.replace(ops, **{name: value}), out, partial)
        with pytest.raises(ValueError, match="^partial"):
            cuda_launch.check_launch(head, ops, out, torch.empty(1, 60, device="cuda", dtype=acc))
        with pytest.raises(ValueError, match="^partial: expected"):
            cuda_launch.check_launch(head, ops, out)  # the head kernels need their scratch
        with pytest.raises(ValueError, match="^out"):
            cuda_launch.check_launch(head, ops, torch.empty(2, 5, 6, device="cuda", dtype=acc), partial)
        noncontig = torch.empty(2, 4, 5, 6, device="cuda", dtype=dtype).transpose(2, 3)
        with pytest.raises(ValueError, match="feature map 0: expected a contiguous"):
            cuda_launch.check_launch(head, dataclasses.replace(ops, maps=(noncontig, ops.maps[1])), out, partial)
        with pytest.raises(ValueError, match="1 to 4 feature maps"):
            cuda_launch.check_launch(head, dataclasses.replace(ops, maps=ops.maps * 3), out, partial)
    cpu_ops, cpu_partial, cpu_out = _launch_args(dtype, device="cpu")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        cuda_launch.check_launch(head, cpu_ops, cpu_out, cpu_partial)
    if native.has_native_cuda():  # the compiled launcher checks before any pointer crosses
        with pytest.raises(ValueError, match="need CUDA tensors"):
            head_op.SPEC.launchers["native"](cpu_ops, out=cpu_out, partial=cpu_partial)
    if cupy_jit.cupy_importable():  # and so does the CuPy one
        with pytest.raises(ValueError, match="need CUDA tensors"):
            head_op.SPEC.launchers["cupy"](cpu_ops, out=cpu_out, partial=cpu_partial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_residual_argument_checks(dtype):
    """The residual launch: q is (h0 w0, r), out (B, h0, w0, r) in the accumulation dtype, no scratch."""
    acc = compute_dtype(dtype)
    residual = residual_op.KERNELS
    with FakeTensorMode():
        head_ops, head_partial, _ = _launch_args(dtype)
        ops = dataclasses.replace(head_ops, q=torch.zeros(30, 70, device="cuda", dtype=acc))
        out = residual.new_out(ops)
        assert out.shape == (2, 6, 5, 70) and out.dtype == acc and residual.new_partial(ops) is None
        assert cuda_launch.check_launch(residual, ops, out) == DTYPE_NAMES[dtype]
        with pytest.raises(ValueError, match=r"^q: expected a contiguous .* \(30, 70\)"):
            cuda_launch.check_launch(residual, head_ops, out)  # the head's (r,) q
        with pytest.raises(ValueError, match="^q"):
            cuda_launch.check_launch(residual, dataclasses.replace(ops, q=ops.q.to(torch.float16)), out)
        with pytest.raises(ValueError, match="^q"):
            cuda_launch.check_launch(residual, dataclasses.replace(ops, q=ops.q.T), out)  # not contiguous
        with pytest.raises(ValueError, match=r"^out: expected a contiguous .* \(2, 6, 5, 70\)"):
            cuda_launch.check_launch(residual, ops, torch.empty(2, 6, 5, device="cuda", dtype=acc))
        with pytest.raises(ValueError, match="^out"):
            wrong = torch.float32 if acc == torch.float64 else torch.float64
            cuda_launch.check_launch(residual, ops, torch.empty(2, 6, 5, 70, device="cuda", dtype=wrong))
        with pytest.raises(ValueError, match="^partial: the crd_residual kernels take no scratch"):
            cuda_launch.check_launch(residual, ops, out, head_partial)
        with pytest.raises(ValueError, match="^matrix"):
            cuda_launch.check_launch(
                residual, dataclasses.replace(ops, matrix=torch.empty(70, 8, device="cuda", dtype=dtype)), out
            )
        with pytest.raises(ValueError, match="1 to 4 feature maps"):
            cuda_launch.check_launch(residual, dataclasses.replace(ops, maps=ops.maps * 3), out)
    cpu_head_ops, _, _ = _launch_args(dtype, device="cpu")
    cpu_ops = dataclasses.replace(cpu_head_ops, q=torch.zeros(30, 70, dtype=acc))
    cpu_out = residual.new_out(cpu_ops)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        cuda_launch.check_launch(residual, cpu_ops, cpu_out)
    if cuda_launch.has_compiled(residual):  # the compiled launcher checks before any pointer crosses
        with pytest.raises(ValueError, match="need CUDA tensors"):
            residual_op.SPEC.launchers["native"](cpu_ops, out=cpu_out)
    if cupy_jit.cupy_importable():  # and so does the CuPy one
        with pytest.raises(ValueError, match="need CUDA tensors"):
            residual_op.SPEC.launchers["cupy"](cpu_ops, out=cpu_out)


# ---- the CUDA source: shipped, and it builds with NVRTC (CuPy path) and nvcc without spills ----------------
def test_kernel_source_is_shipped():
    path = kernel_config.source_path()
    assert path is not None, "crd_head_kernels.cuh is missing from the install"
    text = path.read_text()
    for entry in ENTRIES:
        assert f"{entry}(" in text or f"({entry}," in text
    repo_copy = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "crd_head_kernels.cuh"
    if repo_copy.is_file():
        assert text == repo_copy.read_text()


def _nvrtc_program():
    try:
        from cupy.cuda import compiler

        return compiler._NVRTCProgram  # CuPy's NVRTC wrapper: compiles without a device
    except Exception:
        return None


@pytest.mark.skipif(_nvrtc_program() is None, reason="CuPy's NVRTC is not importable")
@pytest.mark.parametrize("arch", ["75", "80", "90"])
def test_cupy_source_compiles_with_nvrtc(arch):
    from cupy.cuda.compiler import CompileException

    try:
        program = _nvrtc_program()(kernel_config.source_text(), name="crd_head_kernels.cu")
        ptx, _ = program.compile(cupy_jit.nvrtc_options() + (f"-arch=compute_{arch}",))
    except CompileException:
        raise  # the source does not build with NVRTC: a real failure
    except Exception as exc:  # no loadable libnvrtc: an environment gap, not a source error
        pytest.skip(f"NVRTC unavailable here: {exc}")
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    entries = re.findall(r"\.entry\s+(\w+)\(", ptx)
    assert sorted(entries) == sorted(ENTRIES)
    assert "wmma.mma.sync" in ptx  # the half-precision kernels run on tensor cores (fp16 from sm_75, bf16 from sm_80)
    for mode in ("head", "residual"):
        f16 = ptx[ptx.index(f".entry crd_{mode}_tile_f16") :].split(".entry", 2)[1]
        assert "wmma.mma.sync" in f16 and "trap;" not in f16
    for entry in ENTRIES:  # deterministic by construction: one writer per output element, no atomics anywhere
        body = ptx[ptx.index(f".entry {entry}(") :].split(".entry", 2)[1]
        assert not re.search(r"\b(atom|red)\.", body), entry
        bf16 = ptx[ptx.index(f".entry crd_{mode}_tile_bf16") :].split(".entry", 2)[1]  # the bf16 kernel's body
        if arch == "75":  # no bf16 fragments below sm_80: the entry is a trapping stub there
            assert "trap;" in bf16 and "wmma" not in bf16
        else:
            assert "wmma.mma.sync" in bf16 and "trap;" not in bf16


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_build_has_no_spills(tmp_path):
    source = kernel_config.source_path()
    archs = ("75", "80", "90")
    cmd = [
        "nvcc",
        "-std=c++17",
        "-x",
        "cu",
        "-c",
        *cupy_jit.CODEGEN_FLAGS,
        "-Xptxas",
        "-v",
        "-o",
        str(tmp_path / "k.o"),
    ]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd.append(str(source))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = result.stdout + result.stderr
    props = re.findall(
        r"Function properties for (crd_(?:head|residual)_\w+)\n.*?(\d+) bytes stack frame, "
        r"(\d+) bytes spill stores, (\d+) bytes spill loads",
        report,
    )
    assert sorted({p[0] for p in props}) == sorted(ENTRIES)
    assert len(props) == len(archs) * len(ENTRIES)  # every architecture
    for name, stack, stores, loads in props:
        assert (stack, stores, loads) == ("0", "0", "0"), f"{name}: stack {stack}, spills {stores}/{loads}"
