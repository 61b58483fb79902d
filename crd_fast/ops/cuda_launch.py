"""The launch contract of the CUDA kernels, checked once and shared by every backend, and the compiled launcher.

A launcher is ``launch(ops, out=None, partial=None) -> out`` for one op's :class:`~crd_fast.ops.operands.Kernels`,
made by :func:`launcher` around a backend's body: the compiled one here (:func:`compiled_launcher`, into ``_C``)
and the CuPy one (crd_fast/ops/cupy_jit.py). Every tensor is checked by :func:`check_launch` before any pointer
crosses into C++ or NVRTC code; layouts are those of csrc/cuda/crd_head_kernels.cuh, sizes those of
crd_fast/ops/kernel_config.py.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import native
from .kernel_config import config
from .operands import DTYPE_NAMES, Kernels, Operands

#: ``launch(ops, out=None, partial=None) -> out``: one backend's launcher of one op's kernels.
Launcher = Callable[..., torch.Tensor]
#: A backend's launch body: fills ``out`` (or ``partial``, then ``out``) from checked, non-empty operands; it gets
#: the kernels, the operands, ``out``, ``partial`` (None without a finish step) and the kernel dtype name.
LaunchBody = Callable[[Kernels, Operands, torch.Tensor, Optional[torch.Tensor], str], None]


def check_launch(kernels: Kernels, ops: Operands, out: torch.Tensor, partial: Optional[torch.Tensor] = None) -> str:
    """Checks every tensor ``kernels`` read or write; returns the operand dtype name.

    ``partial`` is the (tiles, N) scratch of kernels with a finish step and must be None for the others.
    """
    maps = ops.maps
    limit = config().max_layers
    if not 1 <= len(maps) <= limit:
        raise ValueError(f"the CUDA kernels take 1 to {limit} feature maps, got {len(maps)}")
    dtype = maps[0].dtype
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"CUDA kernels take {list(DTYPE_NAMES)} maps, got {dtype}")
    device = maps[0].device
    if device.type != "cuda":
        raise ValueError(f"CUDA kernels need CUDA tensors, got device {device}")
    if dtype == torch.bfloat16 and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if 10 * major + minor < config().bf16_min_arch:  # the bf16 entry is a trapping stub there
            raise ValueError(
                f"bfloat16 kernels need sm_{config().bf16_min_arch}, {device} is sm_{major}{minor}: "
                "operand_maps() widens bfloat16 maps to float32 on such devices"
            )
    acc = ops.acc_dtype
    batch, _, h0, w0 = maps[0].shape
    for i, f in enumerate(maps):
        if f.device != device or f.dtype != dtype or f.ndim != 4 or f.shape[0] != batch or not f.is_contiguous():
            raise ValueError(
                f"feature map {i}: expected a contiguous {dtype} (B={batch}, C, H, W) tensor on {device}, got "
                f"{f.dtype} {tuple(f.shape)} on {f.device} (contiguous={f.is_contiguous()})"
            )
    c_total = sum(int(f.shape[1]) for f in maps)
    n = int(batch) * int(h0) * int(w0)

    def need(t: Optional[torch.Tensor], name: str, shape: tuple, want: torch.dtype) -> None:
        if t is None:
            raise ValueError(f"{name}: expected a contiguous {want} {shape} tensor on {device}, got None")
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
    sizes = (int(batch), int(h0), int(w0), r)
    need(matrix, "matrix", (r, c_total), dtype)
    need(ops.q, "q", kernels.q_shape(*sizes), acc)
    need(ops.plan, "plan", (len(maps) * header + len(maps) * rows * 2,), torch.int32)
    need(ops.weights, "weights", (len(maps) * rows * taps,), acc)
    if max(n, c_total, r) >= 2**31:
        raise ValueError(f"sizes beyond int32 (N={n}, C={c_total}, r={r}): split the batch")
    if kernels.finish:
        need(partial, "partial", (config().tiles(r), n), acc)
    elif partial is not None:
        raise ValueError(f"partial: the {kernels.name} kernels take no scratch")
    need(out, "out", kernels.out_shape(*sizes), acc)  # indexed with 64-bit offsets: N r may pass 2^31
    return DTYPE_NAMES[dtype]


def launcher(kernels: Kernels, body: LaunchBody, ready: Callable[[Kernels], Any], backend: str, doc: str) -> Launcher:
    """The launcher ``(ops, out=None, partial=None) -> out`` of ``kernels`` through a backend's ``body``.

    Every backend shares this contract: ``ready(kernels)`` first (raises when the backend is missing), ``out`` and
    ``partial`` allocated when not given (tests/gpu passes poisoned ones), every tensor checked, an empty output
    zeroed without a launch (a rank-0 matrix scores every patch 0), else ``body``.
    """

    def launch(ops: Operands, out: Optional[torch.Tensor] = None, partial: Optional[torch.Tensor] = None):
        ready(kernels)
        out = kernels.new_out(ops) if out is None else out
        partial = kernels.new_partial(ops) if partial is None else partial
        dtype = check_launch(kernels, ops, out, partial)
        if out.numel() == 0 or ops.matrix.shape[0] == 0:
            return out.zero_()
        body(kernels, ops, out, partial, dtype)
        return out

    launch.__name__ = launch.__qualname__ = f"{kernels.name}_{backend}"
    launch.__module__ = body.__module__
    launch.__doc__ = doc
    return launch


def has_compiled(kernels: Kernels) -> bool:
    """True when the compiled module carries ``kernels`` (a CUDA build from before an op's kernels does not)."""
    return native.has_native_cuda() and hasattr(native.compiled(), kernels.compiled_entry)


def _require_compiled(kernels: Kernels) -> None:
    if not native.has_native_cuda():
        raise RuntimeError("crd_fast.ops._C was built without CUDA kernels")
    if not has_compiled(kernels):
        raise RuntimeError(f"crd_fast.ops._C was built before the CUDA {kernels.name} kernels: rebuild it")


def _launch_compiled(
    kernels: Kernels, ops: Operands, out: torch.Tensor, partial: Optional[torch.Tensor], dtype: str
) -> None:
    """Calls ``_C.<name>_cuda``: the operands, then the buffers' pointers (partial and out, or out alone), then the
    sizes and the current stream."""
    batch, h0, w0, c_total, r = ops.sizes
    buffers = (out,) if partial is None else (partial, out)
    with torch.cuda.device(ops.device):
        getattr(native.compiled(), kernels.compiled_entry)(
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


def compiled_launcher(kernels: Kernels) -> Launcher:
    """The launcher of ``kernels`` through the CUDA kernels compiled into ``_C``, on the current stream."""
    return launcher(
        kernels,
        _launch_compiled,
        _require_compiled,
        "native",
        f"""{kernels.name} through the compiled CUDA kernels on the current stream; fills and returns ``out``.

        Arguments ``(ops, out=None, partial=None)``, ``ops`` from the op's ``cuda_operands``.""",
    )


def crd_head_cuda_attributes() -> list[dict[str, Any]]:
    """Registers, local (spill) bytes and static shared bytes of every compiled kernel (needs a GPU)."""
    if not native.has_native_cuda():
        raise RuntimeError("crd_fast.ops._C was built without CUDA kernels")
    return list(native.compiled().crd_head_cuda_attributes())
