"""The fused-head kernels below the op: plan tables, the Cython pass, CUDA argument checks, the shipped
CUDA source (NVRTC and nvcc builds, no spills), and the GPU kernels against the reference where a GPU is."""

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
from helpers import cuda
from torch._subclasses.fake_tensor import FakeTensorMode

from crd_fast.core.dtypes import compute_dtype
from crd_fast.core.embedding import (
    embed_patches,
    patch_matrix,
    pool_feature_map,
    resize_to,
)
from crd_fast.ops import cpu as kcpu
from crd_fast.ops import cuda as kcuda
from crd_fast.ops import cuda_launch, kernel_config, reference
from crd_fast.ops import cupy_jit as cupy_module
from crd_fast.ops import native as _native
from crd_fast.ops.plan import MAX_TAPS, Geometry, axis_matrix, axis_taps, build_tables

needs_fused_cpu = pytest.mark.skipif(not kcpu.available(), reason=f"CPU fused pass not built: {kcpu.import_error()}")
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
        assert kcpu.available(), kcpu.import_error()
        assert kcpu.bf16_pass_available(), "the fused pass was built without its bf16 pass"
    expect_cuda = os.environ.get("CRD_FAST_EXPECT_CUDA_KERNELS")
    if expect_cuda == "1":
        assert _native.has_native_cuda() and hasattr(_native._C, "crd_head_cuda")
        assert hasattr(_native._C, "crd_residual_cuda") and cuda_launch.has_residual_kernels()
    elif expect_cuda == "0":  # the CPU-only build (CRD_FAST_CUDA=OFF)
        assert not _native.has_native_cuda() and not hasattr(_native._C, "crd_head_cuda")
        assert not hasattr(_native._C, "crd_residual_cuda") and not cuda_launch.has_residual_kernels()


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
        kcpu._crd_head_cpu.fused_pass(
            str(dtype).split(".")[1], *_pointers(zs, plan, weights, q, out), batch, 9, 7, r, 15, threads
        )
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # one thread per output row: thread count never changes a bit


@needs_fused_cpu
def test_fused_pass_refuses_bad_arguments():
    with pytest.raises(TypeError, match="'float32' or 'float64'"):
        kcpu._crd_head_cpu.fused_pass("float16", [0], 0, 0, 0, 0, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="num_threads"):
        kcpu._crd_head_cpu.fused_pass("float32", [0], 0, 0, 0, 0, 1, 1, 1, 1, 1, 0)


needs_bf16_pass = pytest.mark.skipif(not kcpu.bf16_pass_available(), reason="the bf16 pass is not built")


def _runnable_isas() -> list[str]:
    """The bf16 pass's compiled variants this processor runs (all up to the best one)."""
    if not kcpu.bf16_pass_available():
        return []
    isas = list(kcpu._crd_head_cpu.BF16_ISAS)
    return isas[: isas.index(kcpu.bf16_isa()) + 1]


def _bf16_pass(zs, plan, weights, q, out, batch, h0, w0, r, max_w, threads, residual, isa):
    kcpu._crd_head_cpu.fused_pass_bf16(
        *_pointers(zs, plan, weights, q, out), batch, h0, w0, r, max_w, threads, residual, isa
    )


@needs_bf16_pass
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("r", [37, 300])  # one channel block with a tail; three blocks, the last partial
def test_bf16_pass_matches_dense_formula(isa, r):
    """bfloat16 projections, float32 arithmetic: against the float64 formula on the same (widened) bf16 values,
    so float32 rounding is the only difference; every compiled variant this processor runs, 1 and 2 threads."""
    if isa not in _runnable_isas():
        pytest.skip(f"this processor does not run the {isa} variant (best: {kcpu.bf16_isa()})")
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
        kcpu._crd_head_cpu.fused_pass_bf16([0], 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, False, "sse9")
    with pytest.raises(ValueError, match="num_threads"):
        kcpu._crd_head_cpu.fused_pass_bf16([0], 0, 0, 0, 0, 1, 1, 1, 1, 1, 0)


@needs_fused_cpu
def test_fused_head_cpu_checks_and_fills_out():
    gen = torch.Generator().manual_seed(3)
    maps = [torch.randn(2, 4, 5, 6, generator=gen), torch.randn(2, 3, 3, 3, generator=gen)]
    matrix_t = torch.randn(7, 5, generator=gen)
    q = torch.randn(5, generator=gen)
    out = torch.full((2, 5, 6), float("nan"))
    assert kcpu.fused_head_cpu(maps, matrix_t, q, out=out) is out and torch.isfinite(out).all()
    embed = patch_matrix(embed_patches([m.double() for m in maps]))
    want = torch.linalg.vector_norm(embed @ matrix_t.double() - q.double(), dim=1).reshape(2, 5, 6)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
    with pytest.raises(TypeError, match="float32 or float64"):
        kcpu.fused_head_cpu([m.half() for m in maps], matrix_t, q)
    with pytest.raises(ValueError, match="matrix_t must be a contiguous"):
        kcpu.fused_head_cpu(maps, torch.randn(5, 7).T, q)
    with pytest.raises(ValueError, match=r"matrix_t must be .* \(7, r\)"):
        kcpu.fused_head_cpu(maps, matrix_t[:6], q)
    with pytest.raises(ValueError, match="q must be"):
        kcpu.fused_head_cpu(maps, matrix_t, q.double())
    with pytest.raises(ValueError, match="out must be"):
        kcpu.fused_head_cpu(maps, matrix_t, q, out=torch.empty(2, 6, 5))
    with pytest.raises(ValueError, match="feature map 1"):
        kcpu.fused_head_cpu([maps[0], maps[1].double()], matrix_t, q)


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
    ops = cuda_launch.Operands(
        maps=maps,
        plan=torch.zeros(2 * 4 + 2 * rows * 2, device=device, dtype=torch.int32),
        weights=torch.zeros(2 * rows * 4, device=device, dtype=acc),
        matrix=torch.zeros(r, 7, device=device, dtype=dtype),
        q=torch.zeros(r, device=device, dtype=acc),
    )
    return ops, torch.empty(2, batch * 30, device=device, dtype=acc), torch.empty(batch, 6, 5, device=device, dtype=acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_argument_checks(dtype):
    with FakeTensorMode():
        ops, partial, out = _launch_args(dtype)
        assert cuda_launch.check_launch(ops, partial, out) == cuda_launch.HEAD_DTYPES[dtype]
        acc = compute_dtype(dtype)
        bad_ops = {
            "q": torch.empty(69, device="cuda", dtype=acc),
            "weights": torch.empty(88, device="cuda", dtype=torch.float16),
            "plan": torch.empty(52, device="cuda", dtype=torch.int64),
            "matrix": torch.empty(70, 8, device="cuda", dtype=dtype),
        }
        for name, value in bad_ops.items():
            with pytest.raises(ValueError, match=f"^{name}"):
                cuda_launch.check_launch(dataclasses.replace(ops, **{name: value}), partial, out)
        with pytest.raises(ValueError, match="^partial"):
            cuda_launch.check_launch(ops, torch.empty(1, 60, device="cuda", dtype=acc), out)
        with pytest.raises(ValueError, match="^out"):
            cuda_launch.check_launch(ops, partial, torch.empty(2, 5, 6, device="cuda", dtype=acc))
        noncontig = torch.empty(2, 4, 5, 6, device="cuda", dtype=dtype).transpose(2, 3)
        with pytest.raises(ValueError, match="feature map 0: expected a contiguous"):
            cuda_launch.check_launch(dataclasses.replace(ops, maps=(noncontig, ops.maps[1])), partial, out)
        with pytest.raises(ValueError, match="1 to 4 feature maps"):
            cuda_launch.check_launch(dataclasses.replace(ops, maps=ops.maps * 3), partial, out)
    cpu_ops, cpu_partial, cpu_out = _launch_args(dtype, device="cpu")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        cuda_launch.check_launch(cpu_ops, cpu_partial, cpu_out)
    if _native.has_native_cuda():  # the compiled launcher checks before any pointer crosses
        with pytest.raises(ValueError, match="need CUDA tensors"):
            cuda_launch.crd_head_cuda(cpu_ops, out=cpu_out, partial=cpu_partial)
    if cupy_module.cupy_importable():  # and so does the CuPy one
        with pytest.raises(ValueError, match="need CUDA tensors"):
            cupy_module.crd_head_cupy(cpu_ops, out=cpu_out, partial=cpu_partial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_residual_argument_checks(dtype):
    """The residual launch: q is (h0 w0, r), out (B, h0, w0, r) in the accumulation dtype, no scratch."""
    acc = compute_dtype(dtype)
    with FakeTensorMode():
        head_ops, _, _ = _launch_args(dtype)
        ops = dataclasses.replace(head_ops, q=torch.zeros(30, 70, device="cuda", dtype=acc))
        out = ops.new_residual_out()
        assert out.shape == (2, 6, 5, 70) and out.dtype == acc
        assert cuda_launch.check_residual_launch(ops, out) == cuda_launch.HEAD_DTYPES[dtype]
        with pytest.raises(ValueError, match=r"^q: expected a contiguous .* \(30, 70\)"):
            cuda_launch.check_residual_launch(head_ops, out)  # the head's (r,) q
        with pytest.raises(ValueError, match="^q"):
            cuda_launch.check_residual_launch(dataclasses.replace(ops, q=ops.q.to(torch.float16)), out)
        with pytest.raises(ValueError, match="^q"):
            cuda_launch.check_residual_launch(dataclasses.replace(ops, q=ops.q.T), out)  # not contiguous
        with pytest.raises(ValueError, match=r"^out: expected a contiguous .* \(2, 6, 5, 70\)"):
            cuda_launch.check_residual_launch(ops, torch.empty(2, 6, 5, device="cuda", dtype=acc))
        with pytest.raises(ValueError, match="^out"):
            wrong = torch.float32 if acc == torch.float64 else torch.float64
            cuda_launch.check_residual_launch(ops, torch.empty(2, 6, 5, 70, device="cuda", dtype=wrong))
        with pytest.raises(ValueError, match="^matrix"):
            cuda_launch.check_residual_launch(
                dataclasses.replace(ops, matrix=torch.empty(70, 8, device="cuda", dtype=dtype)), out
            )
        with pytest.raises(ValueError, match="1 to 4 feature maps"):
            cuda_launch.check_residual_launch(dataclasses.replace(ops, maps=ops.maps * 3), out)
    cpu_head_ops, _, _ = _launch_args(dtype, device="cpu")
    cpu_ops = dataclasses.replace(cpu_head_ops, q=torch.zeros(30, 70, dtype=acc))
    cpu_out = cpu_ops.new_residual_out()
    with pytest.raises(ValueError, match="need CUDA tensors"):
        cuda_launch.check_residual_launch(cpu_ops, cpu_out)
    if cuda_launch.has_residual_kernels():  # the compiled launcher checks before any pointer crosses
        with pytest.raises(ValueError, match="need CUDA tensors"):
            cuda_launch.crd_residual_cuda(cpu_ops, out=cpu_out)
    if cupy_module.cupy_importable():  # and so does the CuPy one
        with pytest.raises(ValueError, match="need CUDA tensors"):
            cupy_module.crd_residual_cupy(cpu_ops, out=cpu_out)


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
        ptx, _ = program.compile(cupy_module.nvrtc_options() + (f"-arch=compute_{arch}",))
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
        *cupy_module.CODEGEN_FLAGS,
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


# ---- on a GPU: every backend against the float64 reference, outputs poisoned first ---------------------
def _gpu_backends():
    names = []
    if _native.has_native_cuda():
        names.append("native")
    if cupy_module.available() and cupy_module.compile_error(torch.cuda.current_device()) is None:
        names.append("cupy")
    return names


@cuda
@pytest.mark.parametrize("backend", ["native", "cupy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shapes,r", [([(5, 7, 9), (6, 4, 5)], 70), ([(64, 28, 28), (128, 14, 14)], 130), ([(3, 1, 1)], 1)]
)
def test_gpu_kernels_match_reference(backend, dtype, shapes, r):
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not available")
    gen = torch.Generator().manual_seed(r)
    maps = [torch.randn((3, *s), generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    d = sum(s[0] for s in shapes)
    matrix = torch.randn(r, d, generator=gen, dtype=torch.float64) / d**0.5
    offset = torch.randn(d, generator=gen, dtype=torch.float64)
    want = reference.crd_head(maps, matrix, offset)
    cap = torch.cuda.get_device_capability()
    operands = kcuda.prepare([m.cuda() for m in maps], matrix.cuda(), offset.cuda(), "concat", 1024, cap)
    out = operands.new_out().fill_(float("nan"))
    partial = operands.new_partial().fill_(float("nan"))
    kcuda.run(operands, backend, out=out, partial=partial)
    torch.cuda.synchronize()
    got = out.cpu()
    assert torch.isfinite(got).all(), "some scores were never written"
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 3e-2)
    err = float(((got.double() - want).abs() / want.abs()).max())
    assert err < tol, f"{backend} {dtype}: max relative error {err}"


def _residual_want(maps, matrix, q, operand):
    """The float64 reference for float32/float64 operands, else the kernel's own roundings (embedding and folded
    matrix rounded once to the operand dtype, q in float32), in float64."""
    if operand in (torch.float32, torch.float64):
        return reference.crd_residual(maps, matrix, q)
    b, _, h, w = maps[0].shape
    emb = patch_matrix(embed_patches([m.double() for m in maps])).to(operand).double()
    rows = emb @ matrix.to(operand).double().T - q.float().double().repeat(b, 1)
    return rows.reshape(b, h, w, -1)


RESIDUAL_SHAPES = {  # (C, H, W) per layer: odd grids, resized and downsampled layers, 1 to 4 layers
    1: [(5, 7, 9)],
    2: [(6, 9, 7), (10, 4, 5)],
    3: [(3, 5, 11), (7, 3, 3), (4, 11, 13)],
    4: [(9, 9, 9), (12, 5, 5), (16, 3, 3), (8, 2, 2)],
}


@cuda
@pytest.mark.parametrize("backend", ["native", "cupy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("r", [1, 70, 130])
def test_gpu_residual_kernels_match_reference(backend, dtype, layers, r):
    """Every element of the (B, h0, w0, r) output written (poisoned first), equal to the float64 reference (or the
    same-roundings model for half operands) in the norm-relative sense, and identical on a rerun."""
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not available")
    gen = torch.Generator().manual_seed(1000 * layers + r)
    shapes = RESIDUAL_SHAPES[layers]
    maps = [torch.randn((3, *s), generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    d = sum(s[0] for s in shapes)
    h0, w0 = shapes[0][1:]
    matrix = torch.randn(r, d, generator=gen, dtype=torch.float64) / d**0.5
    q = torch.randn(h0 * w0, r, generator=gen, dtype=torch.float64)
    cap = torch.cuda.get_device_capability()
    operands = kcuda.prepare_residual([m.cuda() for m in maps], matrix.cuda(), q.cuda(), "concat", 1024, cap)
    runs = []
    for _ in range(2):
        out = operands.new_residual_out().fill_(float("nan"))
        kcuda.run_residual(operands, backend, out=out)
        torch.cuda.synchronize()
        runs.append(out.cpu())
    got = runs[0]
    assert got.shape == (3, h0, w0, r) and torch.isfinite(got).all(), "some residuals were never written"
    assert torch.equal(runs[0], runs[1]), "two runs differ"
    want = _residual_want(maps, matrix, q, operands.dtype)
    tol = {torch.float64: 1e-12}.get(operands.dtype, 2e-5)
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < tol, f"{backend} {dtype}: norm-relative error {err}"


@cuda
def test_gpu_residual_op_and_local_head_use_the_kernels():
    """The op's decision on this GPU is a kernel path, and LocalCRDHead on CUDA (fused) scores as on the CPU."""
    from crd_fast.core.local import LocalCRDModel, local_eigenpairs_from_patches
    from crd_fast.models.local_head import LocalCRDHead
    from crd_fast.ops import cuda_dispatch

    assert cuda_dispatch.decide(torch.device("cuda"), cuda_dispatch.RESIDUAL).path != "reference"
    gen = torch.Generator().manual_seed(77)
    specs = [(6, 7, 5), (5, 3, 3)]
    base = [3 * torch.randn(1, c, h, w, generator=gen, dtype=torch.float64) for c, h, w in specs]
    train = [b + torch.randn(12, *b.shape[1:], generator=gen, dtype=torch.float64) for b in base]
    test = [b + torch.randn(2, *b.shape[1:], generator=gen, dtype=torch.float64) for b in base]
    grids = patch_matrix(embed_patches(train)).reshape(12, 35, 11)
    means, vals, vecs = local_eigenpairs_from_patches(grids, 3)
    xc = grids - means
    model = LocalCRDModel.build(means, (xc.reshape(-1, 11).T @ xc.reshape(-1, 11)) / (12 * 35), vals, vecs, 0.5)
    want = model.scores(patch_matrix(embed_patches(test)).reshape(2, 35, 11), 0.05).reshape(2, 7, 5)
    head = LocalCRDHead.from_model(model, 0.05, layer_channels=[6, 5], grid=(7, 5)).cuda()
    got = head([m.float().cuda() for m in test]).cpu()
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert got.dtype == torch.float32 and err < 1e-5, err


@cuda
def test_gpu_kernel_resources():
    if not _native.has_native_cuda():
        pytest.skip("no compiled CUDA kernels")
    for k in cuda_launch.crd_head_cuda_attributes():
        assert k["local_bytes"] == 0, k  # no spills to local memory on this device's binary
