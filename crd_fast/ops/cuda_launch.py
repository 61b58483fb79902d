"""The launch contract of the CUDA head kernels, shared by the compiled (``_C``) and CuPy launchers.

Every tensor a kernel reads or writes is checked here before any pointer crosses into C++ or NVRTC code;
layouts are those of csrc/cuda/crd_head_kernels.cuh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import native
from .native import has_native_cuda


#: torch dtype -> dtype name of the fused head kernels (operand dtype; fp16/bf16 accumulate in float32).
HEAD_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def head_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and output) dtype of the head kernels for operand ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_head_cuda_args(
    maps: list[torch.Tensor],
    plan: torch.Tensor,
    weights: torch.Tensor,
    matrix: torch.Tensor,
    q: torch.Tensor,
    partial: torch.Tensor,
    out: torch.Tensor,
) -> str:
    """Checks every tensor the CUDA head kernels read or write; returns the operand dtype name.

    Shared by the compiled launcher below and the CuPy one (crd_fast/ops/cupy_jit.py): both take
    the same pointers with the layouts of csrc/cuda/crd_head_kernels.cuh.
    """
    if not 1 <= len(maps) <= 4:
        raise ValueError(f"the CUDA head kernels take 1 to 4 feature maps, got {len(maps)}")
    dtype = maps[0].dtype
    if dtype not in HEAD_DTYPES:
        raise TypeError(f"CUDA head kernels take {list(HEAD_DTYPES)} maps, got {dtype}")
    device = maps[0].device
    if device.type != "cuda":
        raise ValueError(f"CUDA head kernels need CUDA tensors, got device {device}")
    acc = head_acc_dtype(dtype)
    batch, _, h0, w0 = maps[0].shape
    for i, f in enumerate(maps):
        if f.device != device or f.dtype != dtype or f.ndim != 4 or f.shape[0] != batch or not f.is_contiguous():
            raise ValueError(
                f"feature map {i}: expected a contiguous {dtype} (B={batch}, C, H, W) tensor on {device}, got "
                f"{f.dtype} {tuple(f.shape)} on {f.device} (contiguous={f.is_contiguous()})"
            )
    c_total = sum(int(f.shape[1]) for f in maps)
    n = int(batch) * int(h0) * int(w0)

    def need(t: torch.Tensor, name: str, shape: tuple, want: torch.dtype) -> None:
        if t.device != device or t.dtype != want or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous {want} {shape} tensor on {device}, got {t.dtype} "
                f"{tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})"
            )

    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D (r, {c_total}), got shape {tuple(matrix.shape)}")
    r = int(matrix.shape[0])
    rows = int(h0) + int(w0)
    need(matrix, "matrix", (r, c_total), dtype)
    need(q, "q", (r,), acc)
    need(plan, "plan", (len(maps) * 4 + len(maps) * rows * 2,), torch.int32)
    need(weights, "weights", (len(maps) * rows * 4,), acc)
    need(partial, "partial", ((r + 63) // 64, n), acc)
    need(out, "out", (int(batch), int(h0), int(w0)), acc)
    if max(n, c_total, r) >= 2**31:
        raise ValueError(f"sizes beyond int32 (N={n}, C={c_total}, r={r}): split the batch")
    return HEAD_DTYPES[dtype]


@dataclass(frozen=True)
class HeadLaunch:
    """One checked, non-empty fused-head launch: the operands and their sizes (checked by
    :func:`check_head_cuda_args`), handed to a launcher body by :func:`head_launcher`."""

    dtype: str  #: operand dtype name, a value of HEAD_DTYPES
    maps: list[torch.Tensor]
    plan: torch.Tensor
    weights: torch.Tensor
    matrix: torch.Tensor
    q: torch.Tensor
    partial: torch.Tensor
    out: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.maps[0].device

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        """(batch, h0, w0, c_total, r) as Python ints, the kernels' size arguments."""
        batch, _, h0, w0 = (int(s) for s in self.maps[0].shape)
        return batch, h0, w0, int(self.matrix.shape[1]), int(self.matrix.shape[0])

    def stream(self) -> int:
        """The current torch CUDA stream of the operands' device (the kernels run on it)."""
        return torch.cuda.current_stream(self.device).cuda_stream


def head_launcher(
    body: Callable[[HeadLaunch], None], ready: Callable[[], Any], name: str, doc: str
) -> Callable[..., torch.Tensor]:
    """A fused-head launcher ``(maps, plan, weights, matrix, q, partial, out) -> out`` around ``body``.

    The compiled launcher (:func:`crd_head_cuda`) and the CuPy one (crd_fast/ops/cupy_jit.py) share
    this contract: ``ready()`` first (raises when the backend is missing), then every argument checked
    before any pointer crosses, an empty output zeroed without a launch, else ``body`` fills ``out``.
    """

    def launch(
        maps: list[torch.Tensor],
        plan: torch.Tensor,
        weights: torch.Tensor,
        matrix: torch.Tensor,
        q: torch.Tensor,
        partial: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        ready()
        dtype = check_head_cuda_args(maps, plan, weights, matrix, q, partial, out)
        if out.numel() == 0 or matrix.shape[0] == 0:
            return out.zero_()  # nothing to launch; a rank-0 matrix scores every patch 0
        body(HeadLaunch(dtype, maps, plan, weights, matrix, q, partial, out))
        return out

    launch.__name__ = launch.__qualname__ = name
    launch.__module__ = body.__module__
    launch.__doc__ = doc
    return launch


def _require_native_cuda() -> None:
    if not has_native_cuda():
        raise RuntimeError("crd_fast.ops._C was built without CUDA kernels")


def _launch_compiled(launch: HeadLaunch) -> None:
    batch, h0, w0, c_total, r = launch.sizes
    with torch.cuda.device(launch.device):
        native._C.crd_head_cuda(
            launch.dtype, [f.data_ptr() for f in launch.maps], launch.plan.data_ptr(), launch.weights.data_ptr(),
            launch.matrix.data_ptr(), launch.q.data_ptr(), launch.partial.data_ptr(), launch.out.data_ptr(),
            batch, h0, w0, c_total, r, launch.stream(),
        )


crd_head_cuda = head_launcher(
    _launch_compiled, _require_native_cuda, "crd_head_cuda",
    """Fused CRD head through the compiled CUDA kernels, on the current stream; fills and returns ``out``.

    Arguments ``(maps, plan, weights, matrix, q, partial, out)``; layouts: csrc/cuda/crd_head_kernels.cuh.
    ``crd_fast.ops.crd_head`` is the user-facing entry point.
    """,
)


def crd_head_cuda_attributes() -> list[dict[str, Any]]:
    """Registers, local (spill) bytes and static shared bytes of each compiled head kernel (needs a GPU)."""
    _require_native_cuda()
    return list(native._C.crd_head_cuda_attributes())
