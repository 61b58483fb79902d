"""What one CUDA kernel launch reads: the :class:`Operands` of a call, and the :class:`Kernels` that take them.

An op's CUDA operand builder (``cuda_operands`` of crd_fast/ops/head_op.py and crd_fast/ops/residual_op.py) turns
checked op inputs into one :class:`Operands`: the maps in the operand dtype (:func:`operand_maps`), the folded matrix,
q and the plan tables (the last three cached per matrix / shape, see crd_fast/ops/streams.py). :class:`Kernels`
names the op's kernels in csrc/cuda/crd_head_kernels.cuh and the shapes of its q and output; every launcher
(crd_fast/ops/cuda_launch.py, crd_fast/ops/cupy_jit.py) takes the pair as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.dtypes import compute_dtype
from .kernel_config import config
from .plan import Geometry, geometry_of

#: torch dtype -> dtype name of the kernels (operand dtype; fp16/bf16 accumulate in float32).
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: dtype name -> suffix of the kernels' entry points in crd_head_kernels.cuh.
ENTRY_SUFFIX = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}


def operand_dtype(dtype: torch.dtype, capability: Optional[tuple[int, int]] = None) -> torch.dtype:
    """Operand dtype of the CUDA kernels for maps of ``dtype`` on a device of ``capability`` (major, minor).

    float16 / bfloat16 stay (tensor cores), float64 stays, anything else runs in float32. On devices below
    sm_80 there are no bf16 tensor-core fragments, so bf16 maps are widened (exactly) to float32 there.
    """
    if dtype == torch.bfloat16 and capability is not None:
        if 10 * capability[0] + capability[1] < config().bf16_min_arch:
            return torch.float32
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


@dataclass(frozen=True)
class OperandMaps:
    """Feature maps made ready for the kernels: what every op's operands share."""

    maps: tuple[torch.Tensor, ...]  #: contiguous, in the operand dtype
    geometry: Geometry
    dtype: torch.dtype  #: the operand dtype
    acc_dtype: torch.dtype  #: the accumulation dtype (float64 for float64 maps, else float32)
    device: torch.device


def operand_maps(feature_maps: Sequence[torch.Tensor], capability: Optional[tuple[int, int]] = None) -> OperandMaps:
    """The maps in the operand dtype, contiguous; ``capability`` defaults to the maps' device's."""
    if capability is None and feature_maps[0].device.type == "cuda":
        capability = torch.cuda.get_device_capability(feature_maps[0].device)
    dtype = operand_dtype(feature_maps[0].dtype, capability)
    maps = tuple(f.to(dtype).contiguous() for f in feature_maps)
    return OperandMaps(maps, geometry_of(maps), dtype, compute_dtype(dtype), maps[0].device)


@dataclass(frozen=True)
class Operands:
    """Everything one launch reads, on one CUDA device: built once by an op's ``cuda_operands``.

    ``maps`` are contiguous (B, C_l, H_l, W_l) maps in the operand dtype; ``matrix`` the folded (r, sum C_l) P' in
    the same dtype; ``q`` the op's offsets in the shape its :class:`Kernels` name (crd_head: P mu, (r,);
    crd_residual: one offset per grid position, (h0 w0, r)); ``plan`` (int32) and ``weights`` the tables of
    crd_fast/ops/plan.py, ``q`` and ``weights`` in the accumulation dtype (float64 for float64 maps, else float32).
    """

    maps: tuple[torch.Tensor, ...]
    plan: torch.Tensor
    weights: torch.Tensor
    matrix: torch.Tensor
    q: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.maps[0].device

    @property
    def dtype(self) -> torch.dtype:
        """The operand dtype (of the maps and the matrix)."""
        return self.maps[0].dtype

    @property
    def acc_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        """(batch, h0, w0, c_total, r) as Python ints, the kernels' size arguments."""
        batch, _, h0, w0 = (int(s) for s in self.maps[0].shape)
        return batch, h0, w0, int(self.matrix.shape[1]), int(self.matrix.shape[0])

    @property
    def patches(self) -> int:
        """N = batch h0 w0: the output positions."""
        batch, h0, w0, _, _ = self.sizes
        return batch * h0 * w0

    @property
    def tiles(self) -> int:
        """Row tiles of the matrix (the first dimension of a ``partial`` scratch)."""
        return config().tiles(int(self.matrix.shape[0]))

    def stream(self) -> int:
        """The current torch CUDA stream of the operands' device (the kernels run on it)."""
        return torch.cuda.current_stream(self.device).cuda_stream


@dataclass(frozen=True)
class Kernels:
    """One op's kernels in csrc/cuda/crd_head_kernels.cuh, found by the file's naming convention.

    ``name`` "crd_head": the compiled launcher ``_C.crd_head_cuda``, the tile kernels ``crd_head_tile_<f32|f64|f16|
    bf16>`` and, with ``finish``, ``crd_head_finish_<f32|f64>``: the tiles then write a (tiles, N) partial scratch
    that the finish kernel reduces into the output; without it they write the output themselves. ``q_shape`` and
    ``out_shape`` give the shapes of q and of the output from the sizes (batch, h0, w0, r).
    """

    name: str
    q_shape: Callable[[int, int, int, int], tuple[int, ...]]
    out_shape: Callable[[int, int, int, int], tuple[int, ...]]
    finish: bool = False

    @property
    def compiled_entry(self) -> str:
        """The launcher's name in the compiled module ``_C`` (csrc/bindings.cpp)."""
        return f"{self.name}_cuda"

    def tile_entry(self, dtype_name: str) -> str:
        return f"{self.name}_tile_{ENTRY_SUFFIX[dtype_name]}"

    def finish_entry(self, dtype_name: str) -> str:
        return f"{self.name}_finish_{'f64' if dtype_name == 'float64' else 'f32'}"

    def _sizes(self, ops: Operands) -> tuple[int, int, int, int]:
        batch, h0, w0, _, r = ops.sizes
        return batch, h0, w0, r

    def q_shape_of(self, ops: Operands) -> tuple[int, ...]:
        return self.q_shape(*self._sizes(ops))

    def out_shape_of(self, ops: Operands) -> tuple[int, ...]:
        return self.out_shape(*self._sizes(ops))

    def new_out(self, ops: Operands) -> torch.Tensor:
        """An uninitialised output for ``ops`` (the accumulation dtype, on their device)."""
        return torch.empty(self.out_shape_of(ops), dtype=ops.acc_dtype, device=ops.device)

    def new_partial(self, ops: Operands) -> Optional[torch.Tensor]:
        """An uninitialised (tiles, N) scratch for ``ops``; None for kernels without a finish step."""
        if not self.finish:
            return None
        return torch.empty((ops.tiles, ops.patches), dtype=ops.acc_dtype, device=ops.device)
