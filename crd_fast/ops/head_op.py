"""The fused CRD head ``torch.ops.crd_fast.crd_head``: its :class:`~crd_fast.ops.registry.OpSpec` and ``crd_head``.

    scores = crd_fast.ops.crd_head(feature_maps, matrix, offset, embedding="concat", target_dim=1024)

``feature_maps`` are the backbone's (B, C_l, H_l, W_l) maps; the result is the (B, H_0, W_0) patch
score map of ``crd_fast.ops.reference.crd_head`` (3x3 average pool with zero padding counted, bilinear
resize to the first layer's grid, concat or PatchCore reduction, ||matrix (y - offset)||), without ever
building the (B, d, H_0, W_0) embedding.

Precision: float64 maps are scored in float64; all other maps in float32 (output float32). On CUDA,
float16 / bfloat16 maps stay in that dtype as tensor-core operands (matrix cast to match) with float32
accumulation; on the CPU they are converted to float32 first.

Paths (crd_fast/ops/registry.py registers them for every op): CPU tensors take the fused CPU path
(crd_fast/ops/cpu.py: per-layer BLAS, then one Cython pass); CUDA tensors the ``crd_head_*`` kernels, compiled into
``crd_fast.ops._C`` or built at run time by CuPy, else the reference, decided once per device with one warning
on fallback (crd_fast/ops/cuda_dispatch.py, docs/GPU.md); any other device the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..core.dtypes import compute_dtype
from . import cpu, cuda_dispatch, reference
from .inputs import check_inputs
from .operands import Kernels, Operands, operand_maps
from .plan import folded_operands, tables
from .registry import OpSpec

SCHEMA = "(Tensor[] feature_maps, Tensor matrix, Tensor offset, str embedding, SymInt target_dim) -> Tensor"

#: The head kernels: tiles write a (tiles, N) partial sum of squares, the finish kernel adds them and takes the root.
KERNELS = Kernels(
    "crd_head",
    q_shape=lambda batch, h0, w0, r: (r,),
    out_shape=lambda batch, h0, w0, r: (batch, h0, w0),
    finish=True,
)


def check_head_inputs(
    feature_maps: Sequence[Tensor], matrix: Tensor, offset: Tensor, embedding: str, target_dim: int
) -> None:
    """Refuses malformed head inputs with an error naming the problem (shapes only: safe on fake tensors)."""
    check_inputs(feature_maps, matrix, offset, embedding, target_dim, "offset", _check_offset)


def _check_offset(offset: Tensor, first: Tensor, matrix: Tensor, d: int) -> None:
    if offset.ndim != 1 or offset.shape[0] != d:
        raise ValueError(f"offset must have shape ({d},), got {tuple(offset.shape)}")


def _out_shape(feature_maps: list[Tensor], matrix: Tensor, *_: object) -> tuple[int, ...]:
    b, _, h, w = feature_maps[0].shape
    return (b, h, w)


def _cpu(feature_maps: list[Tensor], matrix: Tensor, offset: Tensor, embedding: str, target_dim: int) -> Tensor:
    dtype = compute_dtype(feature_maps[0].dtype)
    maps = [f.detach().to(dtype) for f in feature_maps]
    channels = tuple(int(f.shape[1]) for f in maps)
    matrix_t, q = folded_operands(matrix, offset, channels, embedding, target_dim, dtype, transposed=True)
    params = ("head", channels, embedding, int(target_dim), dtype)
    gemm_t = cpu.gemm_operand(matrix, offset, params, matrix_t, dtype)
    return cpu.fused_head_cpu(maps, matrix_t, q, gemm_matrix_t=gemm_t)


def cuda_operands(
    feature_maps: Sequence[Tensor],
    matrix: Tensor,
    offset: Tensor,
    embedding: str,
    target_dim: int,
    capability: Optional[tuple[int, int]] = None,
) -> Operands:
    """Kernel operands for checked crd_head inputs on one CUDA device: folded P', q = P mu (r,), plan tables.

    ``capability`` (major, minor) defaults to the maps' device's. Raises :class:`crd_fast.ops.streams.NotPrepared`
    when a cached table or folded matrix would have to be made inside CUDA-graph capture (call this, or the op,
    once before capturing: docs/GPU.md "Caches and streams").
    """
    m = operand_maps(feature_maps, capability)
    p, q = folded_operands(
        matrix, offset, m.geometry.channels, embedding, target_dim, m.dtype, m.acc_dtype, device=m.device
    )
    plan, weights = tables(m.geometry, m.acc_dtype, m.device)
    return Operands(m.maps, plan, weights, p, q)


def _probe_case() -> tuple:
    """A tiny head: two layers, odd grid, a rank-3 matrix."""
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(1, 3, 5, 4, generator=gen), torch.randn(1, 2, 3, 3, generator=gen)]
    return maps, torch.randn(3, 5, generator=gen), torch.randn(5, generator=gen), "concat", 1


SPEC = OpSpec(
    name="crd_head",
    schema=SCHEMA,
    check=check_head_inputs,
    reference=reference.crd_head,
    out_shape=_out_shape,
    cpu=_cpu,
    cpu_ready=cpu.available,
    cuda_operands=cuda_operands,
    kernels=KERNELS,
    launchers=cuda_dispatch.launchers(KERNELS),
    probe_case=_probe_case,
)


def crd_head(
    feature_maps: Sequence[Tensor],
    matrix: Tensor,
    offset: Tensor,
    embedding: str = "concat",
    target_dim: int = 1024,
) -> Tensor:
    """(B, H_0, W_0) CRD patch score map ||matrix (y - offset)|| of the patch embeddings y of ``feature_maps``.

    Args:
        feature_maps: (B, C_l, H_l, W_l) backbone maps on one device, one dtype; the first sets the grid.
        matrix: (r, d) projection (M_pre, or the rank-r W), d = sum C_l ("concat") or ``target_dim``
            ("patchcore"); any floating dtype, on the maps' device. Folded and cast copies are cached
            per matrix tensor (refreshed when it is modified in place).
        offset: (d,) mu.
        embedding: "concat" or "patchcore" (PatchCore's two adaptive average poolings to ``target_dim``).
        target_dim: d of the "patchcore" embedding.

    Returns float64 scores for float64 maps, float32 otherwise (see the module docstring).
    """
    maps = list(feature_maps) if isinstance(feature_maps, (list, tuple)) else feature_maps
    check_head_inputs(maps, matrix, offset, embedding, target_dim)
    return torch.ops.crd_fast.crd_head(maps, matrix, offset, embedding, int(target_dim))
