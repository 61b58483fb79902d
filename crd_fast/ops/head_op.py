"""Torch custom ops of crd-fast: the fused CRD head ``torch.ops.crd_fast.crd_head`` and its residual twin
``torch.ops.crd_fast.crd_residual`` (the per-position part of the local head, at the end of this module).

    scores = crd_fast.ops.crd_head(feature_maps, matrix, offset, embedding="concat", target_dim=1024)

``feature_maps`` are the backbone's (B, C_l, H_l, W_l) maps; the result is the (B, H_0, W_0) patch
score map of ``crd_fast.ops.reference.crd_head`` (3x3 average pool with zero padding counted, bilinear
resize to the first layer's grid, concat or PatchCore reduction, ||matrix (y - offset)||), without ever
building the (B, d, H_0, W_0) embedding.

Precision: float64 maps are scored in float64; all other maps in float32 (output float32). On CUDA,
float16 / bfloat16 maps stay in that dtype as tensor-core operands (matrix cast to match) with float32
accumulation; on the CPU they are converted to float32 first.

Dispatch (registered per device with torch.library, so ``torch.compile`` sees one opaque op with a
fake implementation):

* CPU tensors: the fused CPU path (crd_fast/ops/cpu.py: per-layer BLAS, then one Cython pass);
* CUDA tensors: per device, the kernels compiled into ``crd_fast.ops._C``, else the same source built at run
  time by CuPy, else the reference in float32/float64, checked once per device and falling back with one
  warning instead of raising (crd_fast/ops/cuda_dispatch.py, docs/GPU.md). More layers than the kernels
  take, and a first call inside CUDA-graph capture, also take the reference;
* any other device: the reference.

``crd_residual`` (the local head's fused part, end of this module) dispatches the same way with its own
decision per device (the residual kernels of the same source).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..core.dtypes import compute_dtype
from ..core.embedding import check_embedding, embedding_dim
from ..core.precision import current_head_gemm_dtype
from . import cpu as _cpu
from . import cuda as _cuda
from . import cuda_dispatch, reference, streams
from .kernel_config import CONFIG
from .plan import FOLDS, fold_matrix, folded_operands

_MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["check_head_inputs", "check_residual_inputs", "crd_head", "crd_residual", "output_dtype"]


#: dtype of the score map for feature maps of a dtype: the scoring rule of crd_fast/core/dtypes.py.
output_dtype = compute_dtype


def check_head_inputs(
    feature_maps: Sequence[Tensor], matrix: Tensor, offset: Tensor, embedding: str, target_dim: int
) -> None:
    """Refuses malformed head inputs with an error naming the problem (shapes only: safe on fake tensors)."""
    _check_inputs(feature_maps, matrix, offset, embedding, target_dim)


def check_residual_inputs(
    feature_maps: Sequence[Tensor], matrix: Tensor, q: Tensor, embedding: str, target_dim: int
) -> None:
    """As :func:`check_head_inputs`, with ``q`` the (H_0 W_0, r) per-position offsets of crd_residual."""
    _check_inputs(feature_maps, matrix, q, embedding, target_dim, "q", _residual_offset_shape)


def _residual_offset_shape(first: Tensor, matrix: Tensor) -> tuple[int, int]:
    return (int(first.shape[2]) * int(first.shape[3]), int(matrix.shape[0]))


def _check_inputs(
    feature_maps: Sequence[Tensor],
    matrix: Tensor,
    offset: Tensor,
    embedding: str,
    target_dim: int,
    offset_name: str = "offset",
    offset_shape: Optional[Callable[[Tensor, Tensor], tuple[int, int]]] = None,
) -> None:
    if not isinstance(feature_maps, (list, tuple)) or len(feature_maps) == 0:
        raise ValueError("feature_maps must be a non-empty list of (B, C, H, W) tensors")
    check_embedding(embedding)
    if isinstance(target_dim, bool) or not isinstance(target_dim, int) or target_dim < 1:
        raise ValueError(f"target_dim must be a positive integer, got {target_dim!r}")
    first = feature_maps[0]
    for i, f in enumerate(feature_maps):
        if not isinstance(f, Tensor):
            raise TypeError(f"feature map {i} is a {type(f).__name__}, not a tensor")
        if f.ndim != 4:
            raise ValueError(f"feature map {i} must be 4-D (B, C, H, W), got shape {tuple(f.shape)}")
        if f.dtype not in _MAP_DTYPES:
            raise TypeError(f"feature map {i} has dtype {f.dtype}; expected one of {_MAP_DTYPES}")
        if f.dtype != first.dtype:
            raise TypeError(f"feature maps must share one dtype: map 0 is {first.dtype}, map {i} is {f.dtype}")
        if f.device != first.device:
            raise ValueError(f"feature maps must be on one device: map 0 is on {first.device}, map {i} on {f.device}")
        if f.shape[0] != first.shape[0]:
            raise ValueError(
                f"feature maps must share the batch size: map 0 has {first.shape[0]}, map {i} has {f.shape[0]}"
            )
        if f.shape[1] < 1 or f.shape[2] < 1 or f.shape[3] < 1:
            raise ValueError(f"feature map {i} has an empty channel or spatial dimension: {tuple(f.shape)}")
    d = embedding_dim([f.shape[1] for f in feature_maps], embedding, target_dim)
    for name, t in (("matrix", matrix), (offset_name, offset)):
        _check_operand(name, t, first.device)
    if matrix.ndim != 2 or matrix.shape[1] != d:
        raise ValueError(
            f"matrix must be (r, d) with d={d} for the {embedding!r} embedding of layers "
            f"{[int(f.shape[1]) for f in feature_maps]}, got shape {tuple(matrix.shape)}"
        )
    if offset_shape is None:
        if offset.ndim != 1 or offset.shape[0] != d:
            raise ValueError(f"offset must have shape ({d},), got {tuple(offset.shape)}")
    elif tuple(offset.shape) != offset_shape(first, matrix):
        h, w = int(first.shape[2]), int(first.shape[3])
        raise ValueError(
            f"q must be (P, r) = {offset_shape(first, matrix)}: one offset per position of the {h}x{w} grid of the "
            f"first feature map, got shape {tuple(offset.shape)}"
        )


def _check_operand(name: str, t: Tensor, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the feature maps are on {device}")


def _reference(feature_maps: list[Tensor], matrix: Tensor, offset: Tensor, embedding: str, target_dim: int) -> Tensor:
    dtype = compute_dtype(feature_maps[0].dtype)
    return reference.crd_head(feature_maps, matrix, offset, embedding, target_dim, dtype=dtype).contiguous()


@torch.library.custom_op("crd_fast::crd_head", mutates_args=())
def _crd_head_op(feature_maps: list[Tensor], matrix: Tensor, offset: Tensor, embedding: str, target_dim: int) -> Tensor:
    """Default kernel (devices without a fused path): the reference, in the output dtype."""
    check_head_inputs(feature_maps, matrix, offset, embedding, target_dim)
    return _reference(feature_maps, matrix, offset, embedding, target_dim)


@_crd_head_op.register_kernel("cpu")
def _crd_head_cpu(
    feature_maps: list[Tensor], matrix: Tensor, offset: Tensor, embedding: str, target_dim: int
) -> Tensor:
    check_head_inputs(feature_maps, matrix, offset, embedding, target_dim)
    if not _cpu.available():
        return _reference(feature_maps, matrix, offset, embedding, target_dim)
    dtype = compute_dtype(feature_maps[0].dtype)
    maps = [f.detach().to(dtype) for f in feature_maps]
    channels = tuple(int(f.shape[1]) for f in maps)
    matrix_t, q = folded_operands(matrix, offset, channels, embedding, target_dim, dtype, transposed=True)
    params = ("head", channels, embedding, int(target_dim), dtype)
    gemm_t = _cpu_gemm_operand(matrix, offset, params, matrix_t, dtype)
    return _cpu.fused_head_cpu(maps, matrix_t, q, gemm_matrix_t=gemm_t)


def _cpu_gemm_operand(
    matrix: Tensor, second: Tensor, params: tuple, matrix_t: Tensor, dtype: torch.dtype
) -> Optional[Tensor]:
    """``matrix_t`` in the CPU head's reduced GEMM dtype (crd_fast.core.precision.head_gemm_dtype, float32 maps
    only; docs/DESIGN.md "Compute precision"), cast once per (matrix, offset or q) pair and cached with the folds;
    None when the GEMM runs in ``dtype`` itself."""
    gemm = current_head_gemm_dtype() if dtype == torch.float32 else None
    if gemm is None:
        return None

    def cast() -> tuple[Tensor, Tensor]:
        return matrix_t.to(gemm).contiguous(), matrix_t.new_empty(0)

    return FOLDS.get(matrix, second, (*params, "gemm operand", gemm), cast, torch.device("cpu"))[0]


@_crd_head_op.register_kernel("cuda")
def _crd_head_cuda(
    feature_maps: list[Tensor], matrix: Tensor, offset: Tensor, embedding: str, target_dim: int
) -> Tensor:
    check_head_inputs(feature_maps, matrix, offset, embedding, target_dim)
    return _on_cuda(
        cuda_dispatch.HEAD, _reference, _cuda.prepare, _cuda.run, feature_maps, matrix, offset, embedding, target_dim
    )


def _on_cuda(
    op: str,
    reference_fn: Callable[..., Tensor],
    prepare: Callable[..., Any],
    run: Callable[[Any, str], Tensor],
    feature_maps: list[Tensor],
    matrix: Tensor,
    second: Tensor,
    embedding: str,
    target_dim: int,
) -> Tensor:
    """A checked op call on CUDA tensors: the kernel path the dispatch decided for ``op`` on this device, or the
    reference (more maps than the kernels take, a reference decision, or tables to make inside CUDA-graph capture).
    ``second`` is the op's offset (crd_head) or per-position q (crd_residual)."""
    args = (feature_maps, matrix, second, embedding, target_dim)
    if CONFIG is None or len(feature_maps) > CONFIG.max_layers:
        return reference_fn(*args)
    choice = cuda_dispatch.decide(feature_maps[0].device, op)
    if choice.path == "reference":
        return reference_fn(*args)
    maps = [f.detach() for f in feature_maps]
    try:
        operands = prepare(maps, matrix, second, embedding, target_dim, choice.capability)
    except streams.NotPrepared as exc:
        _warn_once(f"capture-{op}", f"{exc}; this capture records the reference path")
        return reference_fn(*args)
    return run(operands, choice.path)


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@_crd_head_op.register_fake
def _crd_head_fake(
    feature_maps: list[Tensor], matrix: Tensor, offset: Tensor, embedding: str, target_dim: int
) -> Tensor:
    check_head_inputs(feature_maps, matrix, offset, embedding, target_dim)
    b, _, h, w = feature_maps[0].shape
    return feature_maps[0].new_empty((b, h, w), dtype=compute_dtype(feature_maps[0].dtype))


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


# ---- crd_fast::crd_residual: sum - q_p, one offset per grid position (the local head's fused part) -----------
#
# Same embedding and precision rules as crd_head, but q (P, r) holds one projected offset per grid position
# (P = H_0 W_0, row-major) and the result is the (B, H_0, W_0, r) residual vectors, not their norms: the local
# head (crd_fast/models/local_head.py, docs/DESIGN.md "Position-aware CRD") adds its rank-k correction and the norm
# in torch. CPU: the fused Cython pass in its residual mode; CUDA: the residual kernels (crd_residual_tile_* of
# csrc/cuda/crd_head_kernels.cuh), native or CuPy, decided per device with their own probe and the same fallback
# and warning rules as crd_head (crd_fast/ops/cuda_dispatch.py); any other device: the reference.


def _residual_reference(
    feature_maps: list[Tensor], matrix: Tensor, q: Tensor, embedding: str, target_dim: int
) -> Tensor:
    dtype = compute_dtype(feature_maps[0].dtype)
    return reference.crd_residual(feature_maps, matrix, q, embedding, target_dim, dtype=dtype).contiguous()


@torch.library.custom_op("crd_fast::crd_residual", mutates_args=())
def _crd_residual_op(feature_maps: list[Tensor], matrix: Tensor, q: Tensor, embedding: str, target_dim: int) -> Tensor:
    """Default kernel (devices without a fused path): the reference, in the output dtype."""
    check_residual_inputs(feature_maps, matrix, q, embedding, target_dim)
    return _residual_reference(feature_maps, matrix, q, embedding, target_dim)


@_crd_residual_op.register_kernel("cpu")
def _crd_residual_cpu(feature_maps: list[Tensor], matrix: Tensor, q: Tensor, embedding: str, target_dim: int) -> Tensor:
    check_residual_inputs(feature_maps, matrix, q, embedding, target_dim)
    if not _cpu.residual_available():
        return _residual_reference(feature_maps, matrix, q, embedding, target_dim)
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
    gemm_t = _cpu_gemm_operand(matrix, q, params, matrix_t, dtype)
    return _cpu.fused_residual_cpu(maps, matrix_t, q_grid, gemm_matrix_t=gemm_t)


@_crd_residual_op.register_kernel("cuda")
def _crd_residual_cuda(
    feature_maps: list[Tensor], matrix: Tensor, q: Tensor, embedding: str, target_dim: int
) -> Tensor:
    check_residual_inputs(feature_maps, matrix, q, embedding, target_dim)
    return _on_cuda(
        cuda_dispatch.RESIDUAL,
        _residual_reference,
        _cuda.prepare_residual,
        _cuda.run_residual,
        feature_maps,
        matrix,
        q,
        embedding,
        target_dim,
    )


@_crd_residual_op.register_fake
def _crd_residual_fake(
    feature_maps: list[Tensor], matrix: Tensor, q: Tensor, embedding: str, target_dim: int
) -> Tensor:
    check_residual_inputs(feature_maps, matrix, q, embedding, target_dim)
    b, _, h, w = feature_maps[0].shape
    return feature_maps[0].new_empty((b, h, w, matrix.shape[0]), dtype=compute_dtype(feature_maps[0].dtype))


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
        matrix: (r, d) projection, as for :func:`crd_head` (folded and cast copies cached per matrix tensor).
        q: (P, r) offsets, one per position of the first map's H_0 x W_0 grid (P = H_0 W_0, row-major):
            already projected (q_p = matrix mu_p), unlike crd_head's ``offset``.
        embedding, target_dim: as for :func:`crd_head`.

    Returns float64 residuals for float64 maps, float32 otherwise (the rule of :func:`crd_head`).
    """
    maps = list(feature_maps) if isinstance(feature_maps, (list, tuple)) else feature_maps
    check_residual_inputs(maps, matrix, q, embedding, target_dim)
    return torch.ops.crd_fast.crd_residual(maps, matrix, q, embedding, int(target_dim))
