"""CUDA paths of the fused head: compiled kernels in ``_C``, else CuPy's run-time build, else the reference.

``cuda_backend()`` names the path CUDA tensors take; ``prepare`` turns op inputs into the kernels'
operands (contiguous maps in the operand dtype, folded matrix, q, the plan tables), and ``run`` fills a
(B, H0, W0) score map. ``out`` and ``partial`` can be passed in (bench/gpu_check.py poisons them first
to prove every element is written).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import native as _native
from . import cuda_launch
from . import cupy_jit as cupy_module
from .plan import folded_operands, geometry_of, tables

BACKENDS = ("native", "cupy", "reference")
#: Environment override of the CUDA path (for benchmarks and checks): native, cupy or reference.
BACKEND_ENV = "CRD_FAST_CUDA_BACKEND"
MAX_LAYERS = 4  # crd_head::kMaxLayers
TILE_R = 64  # crd_head::kTileR


def cuda_backend() -> str:
    """The path CUDA tensors take: "native" (compiled into _C), "cupy" (run-time build) or "reference"."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
        return forced
    if _native.has_native_cuda():
        return "native"
    if cupy_module.available():
        return "cupy"
    return "reference"


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of the CUDA kernels for maps of ``dtype``: half types stay, float64 stays, else float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


@dataclass
class Operands:
    maps: list[torch.Tensor]
    plan: torch.Tensor
    weights: torch.Tensor
    matrix: torch.Tensor
    q: torch.Tensor

    @property
    def acc_dtype(self) -> torch.dtype:
        return cuda_launch.head_acc_dtype(self.maps[0].dtype)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        b, _, h, w = self.maps[0].shape
        return int(b), int(h), int(w)

    def new_partial(self) -> torch.Tensor:
        b, h, w = self.out_shape
        tiles = (int(self.matrix.shape[0]) + TILE_R - 1) // TILE_R
        return torch.empty((tiles, b * h * w), dtype=self.acc_dtype, device=self.maps[0].device)

    def new_out(self) -> torch.Tensor:
        return torch.empty(self.out_shape, dtype=self.acc_dtype, device=self.maps[0].device)


def prepare(
    feature_maps: Sequence[torch.Tensor], matrix: torch.Tensor, offset: torch.Tensor, embedding: str, target_dim: int
) -> Operands:
    """Kernel operands for checked op inputs on one CUDA device (see crd_fast.ops for the checks)."""
    dtype = operand_dtype(feature_maps[0].dtype)
    maps = [f.to(dtype).contiguous() for f in feature_maps]
    geom = geometry_of(maps)
    acc = cuda_launch.head_acc_dtype(dtype)
    p, q = folded_operands(matrix, offset, geom.channels, embedding, target_dim, dtype, acc, device=maps[0].device)
    plan, weights = tables(geom, acc, maps[0].device)
    return Operands(maps, plan, weights, p, q)


def run(
    ops: Operands, backend: str, out: Optional[torch.Tensor] = None, partial: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Scores (B, H0, W0) through ``backend`` ("native" or "cupy"); fills and returns ``out``."""
    out = ops.new_out() if out is None else out
    partial = ops.new_partial() if partial is None else partial
    if backend == "native":
        return cuda_launch.crd_head_cuda(ops.maps, ops.plan, ops.weights, ops.matrix, ops.q, partial, out)
    if backend == "cupy":
        return cupy_module.crd_head_cupy(ops.maps, ops.plan, ops.weights, ops.matrix, ops.q, partial, out)
    raise ValueError(f"no CUDA kernel backend {backend!r} (native or cupy)")
