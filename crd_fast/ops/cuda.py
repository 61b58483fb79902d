"""The CUDA kernel paths of the fused head: operands built once, then the compiled or the CuPy launcher.

``prepare`` turns checked op inputs into one :class:`~crd_fast.ops.cuda_launch.Operands` (contiguous maps in
the operand dtype, folded matrix, q, plan tables; the last three cached per matrix / shape, see
crd_fast/ops/streams.py), and ``run`` hands it to the launcher of a path ("native": kernels compiled into
``_C``; "cupy": the same source built by NVRTC), filling a (B, H0, W0) score map. Which path a device
takes is decided in crd_fast/ops/cuda_dispatch.py. ``out`` and ``partial`` can be passed in
(bench/gpu_check.py poisons them first to prove every element is written).

``prepare_residual`` / ``run_residual`` are the same for the residual mode (crd_fast::crd_residual, the local
head's fused part): q is (h0 w0, r), one projected offset per grid position, and the output (B, h0, w0, r).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ..core.dtypes import compute_dtype
from .cuda_launch import Operands, config, crd_head_cuda, crd_residual_cuda
from .cupy_jit import crd_head_cupy, crd_residual_cupy
from .plan import FOLDS, fold_matrix, folded_operands, geometry_of, tables

#: Kernel paths and their launchers; "reference" (pure torch) is the op's last resort, not a launcher.
LAUNCHERS = {"native": crd_head_cuda, "cupy": crd_head_cupy}
#: The residual mode's launchers (crd_fast::crd_residual), per path.
RESIDUAL_LAUNCHERS = {"native": crd_residual_cuda, "cupy": crd_residual_cupy}


def operand_dtype(dtype: torch.dtype, capability: Optional[tuple[int, int]] = None) -> torch.dtype:
    """Operand dtype of the CUDA kernels for maps of ``dtype`` on a device of ``capability`` (major, minor).

    float16 / bfloat16 stay (tensor cores), float64 stays, anything else runs in float32. On devices below
    sm_80 there are no bf16 tensor-core fragments, so bf16 maps are widened (exactly) to float32 there.
    """
    if dtype == torch.bfloat16 and capability is not None:
        if 10 * capability[0] + capability[1] < config().bf16_min_arch:
            return torch.float32
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


def _operand_maps(feature_maps: Sequence[torch.Tensor], capability: Optional[tuple[int, int]]) -> tuple:
    """(maps in the operand dtype, contiguous; their geometry; operand dtype; accumulation dtype; device): what the
    head's and the residual kernels' operands share. ``capability`` defaults to the maps' device's."""
    if capability is None and feature_maps[0].device.type == "cuda":
        capability = torch.cuda.get_device_capability(feature_maps[0].device)
    dtype = operand_dtype(feature_maps[0].dtype, capability)
    maps = tuple(f.to(dtype).contiguous() for f in feature_maps)
    return maps, geometry_of(maps), dtype, compute_dtype(dtype), maps[0].device


def prepare(
    feature_maps: Sequence[torch.Tensor],
    matrix: torch.Tensor,
    offset: torch.Tensor,
    embedding: str,
    target_dim: int,
    capability: Optional[tuple[int, int]] = None,
) -> Operands:
    """Kernel operands for checked op inputs on one CUDA device (see crd_fast.ops.head_op for the checks).

    ``capability`` (major, minor) defaults to the maps' device's. Raises
    :class:`crd_fast.ops.streams.NotPrepared` when a cached table or folded matrix would have to be
    made inside CUDA-graph capture.
    """
    maps, geom, dtype, acc, device = _operand_maps(feature_maps, capability)
    p, q = folded_operands(matrix, offset, geom.channels, embedding, target_dim, dtype, acc, device=device)
    plan, weights = tables(geom, acc, device)
    return Operands(maps, plan, weights, p, q)


def run(
    ops: Operands, backend: str, out: Optional[torch.Tensor] = None, partial: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Scores (B, H0, W0) through ``backend`` ("native" or "cupy"); fills and returns ``out``."""
    launcher = LAUNCHERS.get(backend)
    if launcher is None:
        raise ValueError(f"no CUDA kernel backend {backend!r} (one of {sorted(LAUNCHERS)})")
    return launcher(ops, out=out, partial=partial)


def prepare_residual(
    feature_maps: Sequence[torch.Tensor],
    matrix: torch.Tensor,
    q: torch.Tensor,
    embedding: str,
    target_dim: int,
    capability: Optional[tuple[int, int]] = None,
) -> Operands:
    """Residual-kernel operands for checked crd_residual inputs: ``q`` (h0 w0, r) in the accumulation dtype.

    The maps and the folded matrix follow :func:`prepare` (operand dtype, bf16 widened below sm_80); the folded
    matrix and q are cached per (matrix, q) tensor pair like the head's. Raises
    :class:`crd_fast.ops.streams.NotPrepared` inside CUDA-graph capture when something would have to be made.
    """
    maps, geom, dtype, acc, device = _operand_maps(feature_maps, capability)

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        zero = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
        folded, _ = fold_matrix(matrix.detach(), zero, geom.channels, embedding, target_dim)
        p = folded.to(device=device, dtype=dtype).contiguous()
        return p, q.detach().to(device=device, dtype=acc).contiguous()

    params = ("residual", geom.channels, embedding, int(target_dim), dtype, acc, str(device))
    p, q_acc = FOLDS.get(matrix, q, params, fold, device)
    plan, weights = tables(geom, acc, device)
    return Operands(maps, plan, weights, p, q_acc)


def run_residual(ops: Operands, backend: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Residual vectors (B, h0, w0, r) through ``backend`` ("native" or "cupy"); fills and returns ``out``."""
    launcher = RESIDUAL_LAUNCHERS.get(backend)
    if launcher is None:
        raise ValueError(f"no CUDA kernel backend {backend!r} (one of {sorted(RESIDUAL_LAUNCHERS)})")
    return launcher(ops, out=out)
