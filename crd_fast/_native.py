"""The compiled module ``crd_fast._C``, loaded if present, and checked wrappers around it.

``_C`` takes raw pointers; the wrappers here are its only callers and check device, dtype, shape
and contiguity first. Everything works without ``_C`` (the pure-PyTorch path): ``backends()``
says what this installation has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

try:  # the extension is optional: a pure-Python checkout still imports
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on how the package was built
    _C = None
    _IMPORT_ERROR = str(exc)


def has_native() -> bool:
    """True when the compiled module was built and imports."""
    return _C is not None


def has_native_cuda() -> bool:
    """True when the compiled module contains the CUDA kernels (whether or not a GPU is present)."""
    return _C is not None and bool(_C.build_info()["cuda"])


def backends() -> dict[str, Any]:
    """What this installation can run: native CPU kernels, compiled CUDA kernels, a GPU, CuPy, faiss."""
    info: dict[str, Any] = {
        "native": has_native(),
        "native_error": _IMPORT_ERROR,
        "openmp": bool(_C.build_info()["openmp"]) if _C is not None else False,
        "cuda_kernels": has_native_cuda(),
        "cuda_kernels_version": _C.build_info()["cuda_version"] if _C is not None else None,
        "cuda_device": torch.cuda.is_available(),
        "torch": torch.__version__,
    }
    try:
        import cupy  # noqa: F401

        info["cupy"] = True
    except Exception:
        info["cupy"] = False
    try:
        import faiss  # noqa: F401

        info["faiss"] = True
    except Exception:
        info["faiss"] = False
    # the fused head (crd_fast.ops.crd_head): imported here, lazily, because those modules import this one
    from .kernels import cpu as _head_cpu
    from .kernels import cuda as _head_cuda

    info["fused_cpu"] = _head_cpu.available()
    info["fused_cpu_openmp"] = _head_cpu.openmp()
    info["fused_cuda"] = _head_cuda.cuda_backend()
    return info


def _dtype_name(t: torch.Tensor) -> str:
    if t.dtype == torch.float32:
        return "float32"
    if t.dtype == torch.float64:
        return "float64"
    raise TypeError(f"native kernels take float32 or float64, got {t.dtype}")


def residual_norm(z: torch.Tensor, q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row norms ||z_i - q|| through the native kernel (CPU, or CUDA when compiled in).

    Raises RuntimeError when no native kernel serves ``z``'s device: callers choose the torch path
    themselves rather than getting a silent fallback here.
    """
    if _C is None:
        raise RuntimeError(f"crd_fast._C is not available: {_IMPORT_ERROR}")
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D, got shape {tuple(z.shape)}")
    name = _dtype_name(z)
    z = z.contiguous()
    if q is not None:
        if q.shape != (z.shape[1],):
            raise ValueError(f"q must have shape ({z.shape[1]},), got {tuple(q.shape)}")
        if q.dtype != z.dtype or q.device != z.device:
            raise ValueError(f"q must match z in dtype and device ({z.dtype}, {z.device}), got ({q.dtype}, {q.device})")
        q = q.contiguous()
    out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    q_ptr = q.data_ptr() if q is not None else 0
    if z.device.type == "cpu":
        _C.residual_norm_cpu(name, z.data_ptr(), q_ptr, out.data_ptr(), z.shape[0], z.shape[1])
    elif z.device.type == "cuda" and has_native_cuda():
        stream = torch.cuda.current_stream(z.device).cuda_stream
        with torch.cuda.device(z.device):
            _C.residual_norm_cuda(name, z.data_ptr(), q_ptr, out.data_ptr(), z.shape[0], z.shape[1], stream)
    else:
        raise RuntimeError(f"no native residual_norm kernel for device {z.device} in this build")
    return out


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

    Shared by the compiled launcher below and the CuPy one (crd_fast/kernels/cupy_module.py): both take
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

    The compiled launcher (:func:`crd_head_cuda`) and the CuPy one (crd_fast/kernels/cupy_module.py) share
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
        raise RuntimeError("crd_fast._C was built without CUDA kernels")


def _launch_compiled(launch: HeadLaunch) -> None:
    batch, h0, w0, c_total, r = launch.sizes
    with torch.cuda.device(launch.device):
        _C.crd_head_cuda(
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
    return list(_C.crd_head_cuda_attributes())
