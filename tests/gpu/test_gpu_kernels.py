"""On a GPU: every op's kernels through every backend, in every dtype, against the float64 reference (or the
same-roundings model for half operands), outputs poisoned first and every launch run twice (identical bits);
native and CuPy bit for bit; views, empty batches, rank 0, too many layers, a map of more than 2^31 elements;
LocalCRDHead on the device against the float64 LocalCRDModel. Inputs come from printed seeds (tests/gpu/
kernel_checks.py, $CRD_FAST_GPU_SEED)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import cuda

from crd_fast.ops import cuda_dispatch

from .kernel_checks import (
    CHECKS,
    DTYPES,
    LOCAL_HEAD_TOLERANCES,
    TOLERANCES,
    check_case,
    dtype_name,
    launch_twice,
    local_head_error,
    norm_rel,
)

pytestmark = [pytest.mark.cuda, cuda]

BACKENDS = [backend.name for backend in cuda_dispatch.BACKENDS]


def _cases():
    for op, check in CHECKS.items():
        for index, case in enumerate(check.cases):
            marks = [pytest.mark.large] if case.large else []
            yield pytest.param(op, index, id=f"{op}-{case.name}", marks=marks)


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("op,index", list(_cases()))
def test_kernels_match_the_reference(op, index, dtype, path, gpu, capability, base_seed, require_path, record_property):
    check = CHECKS[op]
    require_path(check.spec, path)
    launcher = check.spec.launchers[path]
    outcome = check_case(check, check.cases[index], index, dtype, launcher, gpu, capability, base_seed)
    record_property("error", outcome.error)
    record_property("tol", outcome.tol)
    assert outcome.ok, outcome.describe()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("op", list(CHECKS))
def test_native_and_cupy_give_identical_bits(op, dtype, gpu, capability, base_seed, require_path):
    """Same source, same code-generation flags: the two builds must agree in every bit."""
    check = CHECKS[op]
    spec = check.spec
    require_path(spec, "native")
    require_path(spec, "cupy")
    maps64, matrix, second = check.inputs(base_seed + 300 + check.seed_offset, [(3, 40, 14, 14), (3, 72, 7, 7)], 100)
    maps = [m.to(dtype) for m in maps64]
    a, _, _ = launch_twice(spec, spec.launchers["native"], maps, matrix, second, "concat", 1024, gpu, capability)
    b, _, _ = launch_twice(spec, spec.launchers["cupy"], maps, matrix, second, "concat", 1024, gpu, capability)
    assert torch.equal(a, b), f"max difference {float((a - b).abs().max()):.2e}"


# ---- edge cases, through the registered op ----------------------------------------------------------------
EDGE_SHAPES = [(3, 8, 9, 10), (3, 12, 5, 5)]
VIEWS = {
    "channels_last": lambda m: m.to(memory_format=torch.channels_last),
    "strided batch view": lambda m: torch.stack([m, m], dim=1).flatten(0, 1)[::2],  # not contiguous
    "storage offset view": lambda m: torch.cat([m[:1], m])[1:],
}


def _float32_call(check, gpu, seed, shapes, rank):
    """(the op on float32 device inputs, its float64 reference on the same float32 maps, the maps, matrix, second)."""
    maps64, matrix, second = check.inputs(seed, shapes, rank)
    maps = [m.float().to(gpu) for m in maps64]
    args = (matrix.float().to(gpu), second.float().to(gpu), "concat", 1024)
    want = check.spec.reference([m.float() for m in maps64], matrix, second, "concat", 1024)
    return maps, args, want


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("op", list(CHECKS))
def test_views_of_the_maps(op, view, gpu, base_seed):
    check = CHECKS[op]
    maps, args, want = _float32_call(check, gpu, base_seed + 100, EDGE_SHAPES, 20)
    got = check.spec.torch_op()([VIEWS[view](m) for m in maps], *args)
    assert norm_rel(got, want) < TOLERANCES["float32"], norm_rel(got, want)


@pytest.mark.parametrize("op", list(CHECKS))
def test_an_empty_batch_and_rank_0(op, gpu, base_seed):
    check = CHECKS[op]
    call = check.spec.torch_op()
    maps, args, _ = _float32_call(check, gpu, base_seed + 100, EDGE_SHAPES, 20)
    empty = call([m[:0] for m in maps], *args)
    assert tuple(empty.shape) == check.spec.out_shape([m[:0] for m in maps], *args)
    maps, args, _ = _float32_call(check, gpu, base_seed + 100, EDGE_SHAPES, 0)
    zero = call(maps, *args)  # a rank-0 matrix: every score is ||0|| = 0, every residual vector empty
    assert tuple(zero.shape) == check.spec.out_shape(maps, *args) and bool((zero == 0).all())


@pytest.mark.parametrize("op", list(CHECKS))
def test_five_layers_take_the_reference_through_the_op(op, gpu, base_seed):
    check = CHECKS[op]
    shapes = [(2, 4, 6, 6), (2, 3, 3, 3), (2, 5, 4, 4), (2, 2, 2, 2), (2, 3, 5, 5)]
    maps, args, want = _float32_call(check, gpu, base_seed + 101, shapes, 7)
    got = check.spec.torch_op()(maps, *args)
    assert norm_rel(got, want) < TOLERANCES["float32"], norm_rel(got, want)


#: One float16 feature map of 4.3 GB: more than 2^31 elements.
BIG_SHAPE = (4, 8200, 256, 256)


@pytest.mark.large
@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("op", list(CHECKS))
def test_a_map_of_more_than_2_31_elements(op, path, gpu, capability, base_seed, require_path):
    """64-bit offsets in the gather: the last image of the batch reads past element 2^31."""
    check = CHECKS[op]
    spec = check.spec
    require_path(spec, path)
    shape = BIG_SHAPE
    if math.prod(shape) * 2 * 1.5 > torch.cuda.get_device_properties(gpu).total_memory:
        pytest.skip("not enough device memory")
    gen = torch.Generator(device=gpu).manual_seed(base_seed + 200)
    big = torch.randn(shape, generator=gen, device=gpu, dtype=torch.float16)
    cpu_gen = torch.Generator().manual_seed(base_seed + 201)
    matrix = torch.randn(8, shape[1], generator=cpu_gen, dtype=torch.float64) / math.sqrt(shape[1])
    second = check.second(cpu_gen, shape[1], shape[2], shape[3], 8)
    ops = spec.cuda_operands([big], matrix.to(gpu), second.to(gpu), "concat", 1024, capability=capability)
    got = spec.launchers[path](ops)[-1:].cpu()
    want = check.expected([big[-1:]], matrix, second, "concat", 1024, torch.float16)  # on the GPU
    del big, ops
    torch.cuda.empty_cache()
    assert norm_rel(got, want) < TOLERANCES["float16"], norm_rel(got, want)


# ---- the position-aware head on the device -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_name)
def test_local_head_on_the_gpu_matches_the_local_model(dtype, gpu, base_seed, record_property):
    """LocalCRDHead in eager mode (its fused part: the crd_residual kernels) against the float64 LocalCRDModel."""
    error, out_dtype = local_head_error(gpu, dtype, base_seed)
    record_property("error", error)
    record_property("tol", LOCAL_HEAD_TOLERANCES[dtype])
    assert out_dtype == dtype and error < LOCAL_HEAD_TOLERANCES[dtype], (out_dtype, error)
