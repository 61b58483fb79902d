"""crd_fast.ops.crd_head: every path against the float64 reference, input checks, dispatch, fake and compile."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import cuda
from torch._subclasses.fake_tensor import FakeTensorMode

from crd_fast import ops
from crd_fast.core.dtypes import compute_dtype
from crd_fast.core.embedding import embedding_dim
from crd_fast.ops import cpu, reference
from crd_fast.ops.plan import FOLDS

# (layer shapes without batch, embedding, target_dim, rank or None for full)
CASES = [
    ([(5, 7, 9), (6, 4, 5)], "concat", 1024, None),  # odd sizes, 2x-ish upsampling with uneven ratio
    ([(8, 28, 28), (16, 14, 14)], "concat", 1024, 7),  # wide_resnet50_2 geometry, small channels, rank-r
    ([(6, 6, 6), (10, 3, 3), (4, 1, 2)], "patchcore", 9, None),  # three layers, 1-pixel-high map
    ([(7, 5, 4), (3, 11, 13)], "patchcore", 4, 3),  # a later layer larger than the first: downsampling
    ([(3, 1, 1)], "concat", 1024, None),  # single layer, single pixel
    ([(4, 3, 5), (2, 2, 2), (3, 5, 3), (2, 1, 1), (3, 4, 4)], "concat", 1024, 6),  # five layers
]


def make_inputs(gen: torch.Generator, shapes, embedding, target_dim, rank, batch=2, dtype=torch.float64):
    maps = [torch.randn((batch, *s), generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    d = embedding_dim([s[0] for s in shapes], embedding, target_dim)
    r = d if rank is None else rank
    matrix = torch.randn((r, d), generator=gen, dtype=torch.float64) / d**0.5
    offset = torch.randn(d, generator=gen, dtype=torch.float64)
    return maps, matrix, offset


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-300)).max())


@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpu_float64_matches_reference(case):
    shapes, embedding, target_dim, rank = CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    maps, matrix, offset = make_inputs(gen, shapes, embedding, target_dim, rank, batch=3)
    got = ops.crd_head(maps, matrix, offset, embedding, target_dim)
    want = reference.crd_head(maps, matrix, offset, embedding, target_dim)
    assert got.dtype == torch.float64 and got.shape == want.shape == (3, *shapes[0][1:])
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpu_float32_matches_float64_reference(case):
    shapes, embedding, target_dim, rank = CASES[case]
    gen = torch.Generator().manual_seed(200 + case)
    maps, matrix, offset = make_inputs(gen, shapes, embedding, target_dim, rank, dtype=torch.float32)
    got = ops.crd_head(maps, matrix.float(), offset.float(), embedding, target_dim)
    want = reference.crd_head(maps, matrix, offset, embedding, target_dim)  # maps promoted to float64
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-4


def test_cpu_fused_path_is_taken(monkeypatch):
    """The op's CPU kernel really goes through the compiled pass (not a silent reference fallback)."""
    if os.environ.get("CRD_FAST_EXPECT_NATIVE"):
        assert cpu.available(), cpu.import_error()
    if not cpu.available():
        pytest.skip(f"CPU fused pass not built: {cpu.import_error()}")
    gen = torch.Generator().manual_seed(3)
    maps, matrix, offset = make_inputs(gen, *CASES[0][:3], None)
    calls = []
    original = cpu.fused_head_cpu

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu, "fused_head_cpu", spy)
    ops.crd_head(maps, matrix, offset)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_maps_are_scored_in_float32(dtype):
    gen = torch.Generator().manual_seed(7)
    maps, matrix, offset = make_inputs(gen, *CASES[1][:3], 5, dtype=dtype)
    got = ops.crd_head(maps, matrix, offset)
    assert got.dtype == torch.float32
    # the reference promotes the same half-precision values to float64
    assert rel_err(got, reference.crd_head(maps, matrix, offset)) < 1e-4


def test_layouts_and_views_give_the_same_scores():
    gen = torch.Generator().manual_seed(11)
    maps, matrix, offset = make_inputs(gen, *CASES[0][:3], None, batch=3)
    base = ops.crd_head(maps, matrix, offset)
    channels_last = [m.to(memory_format=torch.channels_last) for m in maps]
    torch.testing.assert_close(ops.crd_head(channels_last, matrix, offset), base, rtol=1e-12, atol=0)
    # a strided batch view, and tuple input
    big = [torch.cat([m, m], dim=0)[::2] for m in maps]
    assert not big[0].is_contiguous()
    torch.testing.assert_close(
        ops.crd_head(tuple(big), matrix, offset), ops.crd_head([m.contiguous() for m in big], matrix, offset)
    )
    torch.testing.assert_close(
        ops.crd_head(big, matrix, offset), reference.crd_head(big, matrix, offset), rtol=1e-10, atol=0
    )


def test_empty_batch_and_rank_zero():
    gen = torch.Generator().manual_seed(5)
    maps, matrix, offset = make_inputs(gen, *CASES[0][:3], None, batch=0)
    assert ops.crd_head(maps, matrix, offset).shape == (0, 7, 9)
    maps, matrix, offset = make_inputs(gen, *CASES[0][:3], None, batch=2)
    zero = ops.crd_head(maps, matrix[:0], offset)
    assert zero.shape == (2, 7, 9) and torch.equal(zero, torch.zeros_like(zero))


def test_fold_cache_follows_in_place_changes():
    gen = torch.Generator().manual_seed(9)
    maps, matrix, offset = make_inputs(gen, *CASES[2][:3], None)
    first = ops.crd_head(maps, matrix, offset, "patchcore", 9)
    matrix.mul_(2.0)  # in place: same tensor object, new version
    torch.testing.assert_close(ops.crd_head(maps, matrix, offset, "patchcore", 9), 2 * first, rtol=1e-12, atol=0)
    offset.zero_()
    torch.testing.assert_close(
        ops.crd_head(maps, matrix, offset, "patchcore", 9),
        reference.crd_head(maps, matrix, offset, "patchcore", 9),
        rtol=1e-10,
        atol=0,
    )
    FOLDS.clear()


def test_bad_inputs_are_refused_with_clear_errors():
    gen = torch.Generator().manual_seed(1)
    maps, matrix, offset = make_inputs(gen, *CASES[0][:3], None)
    with pytest.raises(ValueError, match="non-empty list"):
        ops.crd_head([], matrix, offset)
    with pytest.raises(ValueError, match="4-D"):
        ops.crd_head([maps[0][0]], matrix, offset)
    with pytest.raises(ValueError, match="batch size"):
        ops.crd_head([maps[0], maps[1][:1]], matrix, offset)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.crd_head([maps[0], maps[1].float()], matrix, offset)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ops.crd_head([maps[0].long(), maps[1]], matrix, offset)
    with pytest.raises(ValueError, match=r"matrix must be \(r, d\) with d=11"):
        ops.crd_head(maps, matrix[:, :10], offset)
    with pytest.raises(ValueError, match=r"offset must have shape \(11,\)"):
        ops.crd_head(maps, matrix, offset[:5])
    with pytest.raises(ValueError, match="embedding must be one of"):
        ops.crd_head(maps, matrix, offset, embedding="mean")
    with pytest.raises(ValueError, match="target_dim must be a positive integer"):
        ops.crd_head(maps, matrix, offset, "patchcore", 0)
    with pytest.raises(TypeError, match="floating-point"):
        ops.crd_head(maps, matrix.long(), offset)
    with pytest.raises(ValueError, match="matrix is on meta"):
        ops.crd_head(maps, matrix.to("meta"), offset)
    with pytest.raises(ValueError, match="empty channel or spatial"):
        ops.crd_head([maps[0][:, :, :0]], matrix, offset)
    # the registered op checks too, when called directly
    with pytest.raises(ValueError, match="offset must have shape"):
        torch.ops.crd_fast.crd_head(maps, matrix, offset[:3], "concat", 1024)


def test_opcheck_schema_fake_and_dispatch():
    gen = torch.Generator().manual_seed(21)
    for case in (0, 2):
        shapes, embedding, target_dim, rank = CASES[case]
        maps, matrix, offset = make_inputs(gen, shapes, embedding, target_dim, rank)
        torch.library.opcheck(torch.ops.crd_fast.crd_head.default, (maps, matrix, offset, embedding, target_dim))


def test_fake_kernel_shapes_on_cpu_and_cuda_devices():
    """The fake kernel gives shape, dtype and device without data: also for CUDA tensors on a GPU-less host."""
    with FakeTensorMode():
        for device in ("cpu", "cuda"):
            for dtype, out in (
                (torch.float64, torch.float64),
                (torch.bfloat16, torch.float32),
                (torch.float32, torch.float32),
            ):
                maps = [
                    torch.empty(4, 8, 28, 28, device=device, dtype=dtype),
                    torch.empty(4, 16, 14, 14, device=device, dtype=dtype),
                ]
                got = torch.ops.crd_fast.crd_head(
                    maps, torch.empty(5, 24, device=device), torch.empty(24, device=device), "concat", 1024
                )
                assert got.shape == (4, 28, 28) and got.dtype == out and got.device.type == device
                with pytest.raises(ValueError, match="matrix must be"):
                    torch.ops.crd_fast.crd_head(
                        maps, torch.empty(5, 23, device=device), torch.empty(24, device=device), "concat", 1024
                    )


def test_torch_compile_calls_the_op():
    """torch.compile of a function using the op (aot_eager: the inductor C++ build is too slow for this box)."""
    gen = torch.Generator().manual_seed(31)
    maps, matrix, offset = make_inputs(gen, *CASES[1][:3], 7, dtype=torch.float32)
    matrix, offset = matrix.float(), offset.float()

    def image_scores(a, b, m, o):
        return ops.crd_head([a, b], m, o).amax(dim=(1, 2))

    compiled = torch.compile(image_scores, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*maps, matrix, offset), image_scores(*maps, matrix, offset))
    maps2, _, _ = make_inputs(gen, *CASES[1][:3], 7, batch=3, dtype=torch.float32)  # a new batch size
    torch.testing.assert_close(compiled(*maps2, matrix, offset), image_scores(*maps2, matrix, offset))


# CUDA dispatch, fallbacks and caches (device properties, compile failures and streams faked): test_dispatch.py


# ---- on a GPU -------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("case", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_op_matches_reference(case, dtype):
    shapes, embedding, target_dim, rank = CASES[case]
    gen = torch.Generator().manual_seed(300 + case)
    maps, matrix, offset = make_inputs(gen, shapes, embedding, target_dim, rank, batch=3, dtype=dtype)
    want = reference.crd_head(maps, matrix, offset, embedding, target_dim)
    got = ops.crd_head([m.cuda() for m in maps], matrix.cuda(), offset.cuda(), embedding, target_dim)
    assert got.device.type == "cuda" and got.dtype == compute_dtype(dtype)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 3e-2)
    assert rel_err(got.cpu(), want) < tol
