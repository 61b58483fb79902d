"""The compiled module ``crd_fast.ops._C``: loaded if present, with build facts and the residual-norm wrapper.

``_C`` takes raw pointers; the wrappers here are its only callers and check device, dtype, shape
and contiguity first. Everything works without ``_C`` (the pure-PyTorch path): ``backends()``
says what this installation has.
"""

from __future__ import annotations

from typing import Any, Optional

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


def compiled() -> Any:
    """The compiled module ``_C``; RuntimeError saying why when it did not import."""
    if _C is None:
        raise RuntimeError(f"crd_fast.ops._C is not available: {_IMPORT_ERROR}")
    return _C


def has_native_cuda() -> bool:
    """True when the compiled module contains the CUDA kernels (whether or not a GPU is present)."""
    return _C is not None and bool(_C.build_info()["cuda"])


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
        raise RuntimeError(f"crd_fast.ops._C is not available: {_IMPORT_ERROR}")
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


def build_info() -> dict[str, Any]:
    """What ``_C`` was compiled with (OpenMP, CUDA and its version); empty when it is absent."""
    return dict(_C.build_info()) if _C is not None else {}


def cuda_archs() -> Optional[tuple[str, ...]]:
    """CMAKE_CUDA_ARCHITECTURES that ``_C``'s kernels were built for (e.g. ("75-real", ..., "90")), or None
    when unknown (no CUDA kernels, or a build from before this fact was recorded)."""
    archs = build_info().get("cuda_archs")
    return tuple(a for a in str(archs).split(",") if a) if archs else None


def import_error() -> Optional[str]:
    """Why ``_C`` failed to import, or None."""
    return _IMPORT_ERROR
