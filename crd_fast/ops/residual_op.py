"""The residual op ``torch.ops.crd_fast.crd_residual`` (the local head's fused part): its OpSpec and ``crd_residual``.

    residuals = crd_fast.ops.crd_residual(feature_maps, matrix, q, embedding="concat", target_dim=1024)

Same embedding and precision rules as crd_head (crd_fast/ops/head_op.py), but q (P, r) holds one projected offset
per grid position (P = H_0 W_0, row-major) and the result is the (B, H_0, W_0, r) residual vectors, not their norms:
the local head (crd_fast/models/local_head.py, docs/DESIGN.md "Position-aware CRD") adds its rank-k correction and
the norm in torch. CPU: the fused Cython pass in its residual mode; CUDA: the residual kernels (``crd_residual_tile_*``
of csrc/cuda/crd_head_kernels.cuh), native or CuPy, decided per device with their own probe, fallback and warning
(crd_fast/ops/cuda_dispatch.py); any other device: the reference.
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
from .plan import FOLDS, fold_matrix, tables
from .registry import OpSpec

SCHEMA = "(Tensor[] feature_maps, Tensor matrix, Tensor q, str embedding, SymInt target_dim) -> Tensor"

#: The residual kernels: the head's tile code with the per-position epilogue, writing (B, h0, w0, r) directly.
KERNELS = Kernels(
    "crd_residual",
    q_shape=lambda batch, h0, w0, r: (h0 * w0, r),
    out_shape=lambda batch, h0, w0, r: (batch, h0, w0, r),
)


def check_residual_inputs(
    feature_maps: Sequence[Tensor], matrix: Tensor, q: Tensor, embedding: str, target_dim: int
) -> None:
    """As :func:`crd_fast.ops.check_head_inputs`, with ``q`` the (H_0 W_0, r) per-position offsets of crd_residual."""
    check_inputs(feature_maps, matrix, q, embedding, target_dim, "q", _check_q)


def _check_q(q: Tensor, first: Tensor, matrix: Tensor, d: int) -> None:
    h, w = int(first.shape[2]), int(first.shape[3])
    want = (h * w, int(matrix.shape[0]))
    if tuple(q.shape) != want:
        raise ValueError(
            f"q must be (P, r) = {want}: one offset per position of the {h}x{w} grid of the first feature map, "
            f"got shape {tuple(q.shape)}"
        )


def _out_shape(feature_maps: list[Tensor], matrix: Tensor, *_: object) -> tuple[int, ...]:
    b, _, h, w = feature_maps[0].shape
    return (b, h, w, matrix.shape[0])


def _cpu(feature_maps: list[Tensor], matrix: Tensor, q: Tensor, embedding: str, target_dim: int) -> Tensor:
    dtype = compute_dtype(feature_maps[0].dtype)
    maps = [f.detach().to(dtype) for f in feature_maps]
    channels = tuple(int(f.shape[1]) for f in maps)
    h, w = int(maps[0].shape[2]), int(maps[0].shape[3])

    def fold() -> tuple[Tensor, Tensor]:
        folded, _ = fold_matrix(matrix.detach(), matrix.new_zeros(matrix.shape[1]), channels, embedding, target_dim)
        q_grid = q.detach().to(dtype).reshape(h, w, -1).contiguous()
        return folded.T.to(dtype).contiguous(), q_grid

    params = ("residual", channels, embedding, int(target_dim), dtype, (h, w))
    matrix_t, q_grid = FOLDS.get(matrix, q, params, fold, torch.device("cpu"))
    gemm_t = cpu.gemm_operand(matrix, q, params, matrix_t, dtype)
    return cpu.fused_residual_cpu(maps, matrix_t, q_grid, gemm_matrix_t=gemm_t)


def cuda_operands(
    feature_maps: Sequence[Tensor],
    matrix: Tensor,
    q: Tensor,
    embedding: str,
    target_dim: int,
    capability: Optional[tuple[int, int]] = None,
) -> Operands:
    """Residual-kernel operands for checked crd_residual inputs: folded P', ``q`` (h0 w0, r) in the accumulation
    dtype, plan tables.

    The maps follow the head's rule (operand dtype, bf16 widened below sm_80); the folded matrix and q are cached
    per (matrix, q) tensor pair. Raises :class:`crd_fast.ops.streams.NotPrepared` inside CUDA-graph capture when
    something would have to be made.
    """
    m = operand_maps(feature_maps, capability)

    def fold() -> tuple[Tensor, Tensor]:
        zero = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
        folded, _ = fold_matrix(matrix.detach(), zero, m.geometry.channels, embedding, target_dim)
        p = folded.to(device=m.device, dtype=m.dtype).contiguous()
        return p, q.detach().to(device=m.device, dtype=m.acc_dtype).contiguous()

    params = ("residual", m.geometry.channels, embedding, int(target_dim), m.dtype, m.acc_dtype, str(m.device))
    p, q_acc = FOLDS.get(matrix, q, params, fold, m.device)
    plan, weights = tables(m.geometry, m.acc_dtype, m.device)
    return Operands(m.maps, plan, weights, p, q_acc)


def _probe_case() -> tuple:
    """A tiny crd_residual: two layers, odd grid, batch 2 (so positions repeat across the batch)."""
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)]
    return maps, torch.randn(3, 5, generator=gen), torch.randn(20, 3, generator=gen), "concat", 1


SPEC = OpSpec(
    name="crd_residual",
    schema=SCHEMA,
    check=check_residual_inputs,
    reference=reference.crd_residual,
    out_shape=_out_shape,
    cpu=_cpu,
    cpu_ready=cpu.residual_available,
    cuda_operands=cuda_operands,
    kernels=KERNELS,
    launchers=cuda_dispatch.launchers(KERNELS),
    probe_case=_probe_case,
)


def crd_residual(
    feature_maps: Sequence[Tensor],
    matrix: Tensor,
    q: Tensor,
    embedding: str = "concat",
    target_dim: int = 1024,
) -> Tensor:
    """(B, H_0, W_0, r) residual vectors matrix y_p - q_p of the patch embeddings y_p of ``feature_maps``.

    Args:
        feature_maps: (B, C_l, H_l, W_l) backbone maps on one device, one dtype; the first sets the grid.
        matrix: (r, d) projection, as for :func:`crd_fast.ops.crd_head` (folded and cast copies cached per matrix
            tensor).
        q: (P, r) offsets, one per position of the first map's H_0 x W_0 grid (P = H_0 W_0, row-major):
            already projected (q_p = matrix mu_p), unlike crd_head's ``offset``.
        embedding, target_dim: as for :func:`crd_fast.ops.crd_head`.

    Returns float64 residuals for float64 maps, float32 otherwise (the rule of crd_head).
    """
    maps = list(feature_maps) if isinstance(feature_maps, (list, tuple)) else feature_maps
    check_residual_inputs(maps, matrix, q, embedding, target_dim)
    return torch.ops.crd_fast.crd_residual(maps, matrix, q, embedding, int(target_dim))
