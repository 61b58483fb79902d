"""The launch contract of the CUDA head kernels: one operand object, checked once, taken by both launchers.

:func:`crd_fast.ops.cuda.prepare` builds an :class:`Operands` (maps in the operand dtype, folded matrix,
q, plan tables); the compiled launcher (:data:`crd_head_cuda`, into ``_C``) and the CuPy one
(crd_fast/ops/cupy_jit.py) both take it as it is, with the ``partial`` scratch and the ``out`` map. Every
tensor is checked by :func:`check_launch` before any pointer crosses into C++ or NVRTC code; layouts are
those of csrc/cuda/crd_head_kernels.cuh, sizes those of crd_fast/ops/kernel_config.py.

The residual mode (the local head's fused part) has the same contract with its own operands
(:func:`crd_fast.ops.cuda.prepare_residual`: q is (h0 w0, r), one offset per grid position), no scratch and a
(B, h0, w0, r) ``out``: :func:`check_residual_launch`, :data:`crd_residual_cuda` and its CuPy twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..core.dtypes import compute_dtype
from . import native
from .kernel_config import CONFIG, KernelConfig

#: torch dtype -> dtype name of the fused head kernels (operand dtype; fp16/bf16 accumulate in float32).
HEAD_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def config() -> KernelConfig:
    """The kernels' launch geometry; RuntimeError when the kernel source is not installed."""
    if CONFIG is None:
        raise RuntimeError("crd_head_kernels.cuh is missing from this install: no CUDA head kernel can run")
    return CONFIG


@dataclass(frozen=True)
class Operands:
    """Everything one fused-head launch reads, on one CUDA device: built once by ``cuda.prepare``.

    ``maps`` are contiguous (B, C_l, H_l, W_l) maps in the operand dtype; ``matrix`` the folded (r, sum C_l)
    P' in the same dtype; ``q`` = P mu (r,) for the head kernels, or the (h0 w0, r) per-position offsets for the
    residual kernels; ``plan`` (int32) and ``weights`` the tables of crd_fast/ops/plan.py, ``q`` and ``weights``
    in the accumulation dtype (float64 for float64 maps, else float32).
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
    def out_shape(self) -> tuple[int, int, int]:
        batch, h0, w0, _, _ = self.sizes
        return batch, h0, w0

    @property
    def patches(self) -> int:
        batch, h0, w0 = self.out_shape
        return batch * h0 * w0

    @property
    def tiles(self) -> int:
        """Row tiles of the matrix: the first dimension of ``partial``."""
        return config().tiles(int(self.matrix.shape[0]))

    def new_partial(self) -> torch.Tensor:
        return torch.empty((self.tiles, self.patches), dtype=self.acc_dtype, device=self.device)

    def new_out(self) -> torch.Tensor:
        return torch.empty(self.out_shape, dtype=self.acc_dtype, device=self.device)

    @property
    def residual_shape(self) -> tuple[int, int, int, int]:
        """(B, h0, w0, r): the output of the residual kernels."""
        batch, h0, w0, _, r = self.sizes
        return batch, h0, w0, r

    def new_residual_out(self) -> torch.Tensor:
        return torch.empty(self.residual_shape, dtype=self.acc_dtype, device=self.device)

    def stream(self) -> int:
        """The current torch CUDA stream of the operands' device (the kernels run on it)."""
        return torch.cuda.current_stream(self.device).cuda_stream


def _check_operands(ops: Operands, residual: bool) -> tuple[str, Callable[..., None], int, int]:
    """Checks the maps, matrix, q and tables of either mode; returns (dtype name, the checker ``need``, N, r)."""
    maps = ops.maps
    limit = config().max_layers
    if not 1 <= len(maps) <= limit:
        raise ValueError(f"the CUDA head kernels take 1 to {limit} feature maps, got {len(maps)}")
    dtype = maps[0].dtype
    if dtype not in HEAD_DTYPES:
        raise TypeError(f"CUDA head kernels take {list(HEAD_DTYPES)} maps, got {dtype}")
    device = maps[0].device
    if device.type != "cuda":
        raise ValueError(f"CUDA head kernels need CUDA tensors, got device {device}")
    if dtype == torch.bfloat16 and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if 10 * major + minor < config().bf16_min_arch:  # the bf16 entry is a trapping stub there
            raise ValueError(
                f"bfloat16 kernels need sm_{config().bf16_min_arch}, {device} is sm_{major}{minor}: "
                "prepare() widens bfloat16 maps to float32 on such devices"
            )
    acc = compute_dtype(dtype)
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

    matrix = ops.matrix
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D (r, {c_total}), got shape {tuple(matrix.shape)}")
    r = int(matrix.shape[0])
    rows = int(h0) + int(w0)
    header, taps = config().header, config().max_taps
    need(matrix, "matrix", (r, c_total), dtype)
    need(ops.q, "q", (int(h0) * int(w0), r) if residual else (r,), acc)
    need(ops.plan, "plan", (len(maps) * header + len(maps) * rows * 2,), torch.int32)
    need(ops.weights, "weights", (len(maps) * rows * taps,), acc)
    if max(n, c_total, r) >= 2**31:
        raise ValueError(f"sizes beyond int32 (N={n}, C={c_total}, r={r}): split the batch")
    return HEAD_DTYPES[dtype], need, n, r


def check_launch(ops: Operands, partial: torch.Tensor, out: torch.Tensor) -> str:
    """Checks every tensor the CUDA head kernels read or write; returns the operand dtype name."""
    name, need, n, r = _check_operands(ops, residual=False)
    need(partial, "partial", (config().tiles(r), n), ops.acc_dtype)
    need(out, "out", ops.out_shape, ops.acc_dtype)
    return name


def check_residual_launch(ops: Operands, out: torch.Tensor) -> str:
    """Checks every tensor the CUDA residual kernels read or write (q (h0 w0, r), out (B, h0, w0, r))."""
    name, need, _, _ = _check_operands(ops, residual=True)
    need(out, "out", ops.residual_shape, ops.acc_dtype)  # indexed with 64-bit offsets: N r may pass 2^31
    return name


#: A launcher body: fills ``out`` from checked, non-empty operands; gets the kernel dtype name too.
LaunchBody = Callable[[Operands, torch.Tensor, torch.Tensor, str], None]


def head_launcher(body: LaunchBody, ready: Callable[[], Any], name: str, doc: str) -> Callable[..., torch.Tensor]:
    """A fused-head launcher ``(ops, out=None, partial=None) -> out`` around ``body``.

    The compiled launcher (:data:`crd_head_cuda`) and the CuPy one share this contract: ``ready()`` first
    (raises when the backend is missing), ``out``/``partial`` allocated when not given (bench/gpu_check.py
    passes poisoned ones), every tensor checked, an empty output zeroed without a launch, else ``body``.
    """

    def launch(
        ops: Operands, out: Optional[torch.Tensor] = None, partial: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        ready()
        out = ops.new_out() if out is None else out
        partial = ops.new_partial() if partial is None else partial
        dtype = check_launch(ops, partial, out)
        if out.numel() == 0 or ops.matrix.shape[0] == 0:
            return out.zero_()  # nothing to launch; a rank-0 matrix scores every patch 0
        body(ops, partial, out, dtype)
        return out

    launch.__name__ = launch.__qualname__ = name
    launch.__module__ = body.__module__
    launch.__doc__ = doc
    return launch


#: A residual launcher body: fills ``out`` (B, h0, w0, r) from checked, non-empty operands.
ResidualBody = Callable[[Operands, torch.Tensor, str], None]


def residual_launcher(body: ResidualBody, ready: Callable[[], Any], name: str, doc: str) -> Callable[..., torch.Tensor]:
    """A residual launcher ``(ops, out=None) -> out`` around ``body``: :func:`head_launcher`'s contract, no scratch."""

    def launch(ops: Operands, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        ready()
        out = ops.new_residual_out() if out is None else out
        dtype = check_residual_launch(ops, out)
        if out.numel() == 0:
            return out  # B = 0 or r = 0: nothing to write
        body(ops, out, dtype)
        return out

    launch.__name__ = launch.__qualname__ = name
    launch.__module__ = body.__module__
    launch.__doc__ = doc
    return launch


def _require_native_cuda() -> None:
    if not native.has_native_cuda():
        raise RuntimeError("crd_fast.ops._C was built without CUDA kernels")


def _call_compiled(entry: str, ops: Operands, buffers: tuple[torch.Tensor, ...], dtype: str) -> None:
    """Calls the compiled ``entry`` (crd_head_cuda or crd_residual_cuda): the operands, then ``buffers``' pointers
    (partial and out, or out alone), then the sizes and the current stream."""
    batch, h0, w0, c_total, r = ops.sizes
    with torch.cuda.device(ops.device):
        getattr(native.compiled(), entry)(
            dtype,
            [f.data_ptr() for f in ops.maps],
            ops.plan.data_ptr(),
            ops.weights.data_ptr(),
            ops.matrix.data_ptr(),
            ops.q.data_ptr(),
            *(b.data_ptr() for b in buffers),
            batch,
            h0,
            w0,
            c_total,
            r,
            ops.stream(),
        )


def _launch_compiled(ops: Operands, partial: torch.Tensor, out: torch.Tensor, dtype: str) -> None:
    _call_compiled("crd_head_cuda", ops, (partial, out), dtype)


crd_head_cuda = head_launcher(
    _launch_compiled,
    _require_native_cuda,
    "crd_head_cuda",
    """Fused CRD head through the compiled CUDA kernels, on the current stream; fills and returns ``out``.

    Arguments ``(ops, out=None, partial=None)``; ``ops`` from ``crd_fast.ops.cuda.prepare``.
    ``crd_fast.ops.crd_head`` is the user-facing entry point.
    """,
)


def has_residual_kernels() -> bool:
    """True when the compiled module carries the residual kernels (a CUDA build from before them does not)."""
    return native.has_native_cuda() and hasattr(native.compiled(), "crd_residual_cuda")


def _require_native_residual() -> None:
    _require_native_cuda()
    if not has_residual_kernels():
        raise RuntimeError("crd_fast.ops._C was built before the CUDA residual kernels: rebuild it")


def _launch_compiled_residual(ops: Operands, out: torch.Tensor, dtype: str) -> None:
    _call_compiled("crd_residual_cuda", ops, (out,), dtype)


crd_residual_cuda = residual_launcher(
    _launch_compiled_residual,
    _require_native_residual,
    "crd_residual_cuda",
    """Residual vectors (B, h0, w0, r) through the compiled CUDA kernels, on the current stream; fills ``out``.

    Arguments ``(ops, out=None)``; ``ops`` from ``crd_fast.ops.cuda.prepare_residual``.
    ``crd_fast.ops.crd_residual`` is the user-facing entry point.
    """,
)


def crd_head_cuda_attributes() -> list[dict[str, Any]]:
    """Registers, local (spill) bytes and static shared bytes of each compiled head and residual kernel (a GPU)."""
    _require_native_cuda()
    return list(native.compiled().crd_head_cuda_attributes())
