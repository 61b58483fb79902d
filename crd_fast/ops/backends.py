"""``crd_fast.backends()``: what this installation can run, and which path the fused head takes per device."""

from __future__ import annotations

from typing import Any

import torch

from . import cpu, cuda, native


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:
        return False
    return True


def backends() -> dict[str, Any]:
    """What this installation can run: native CPU kernels, compiled CUDA kernels, a GPU, CuPy, faiss."""
    info = native.build_info()
    return {
        "native": native.has_native(),
        "native_error": native.import_error(),
        "openmp": bool(info.get("openmp", False)),
        "cuda_kernels": native.has_native_cuda(),
        "cuda_kernels_version": info.get("cuda_version"),
        "cuda_device": torch.cuda.is_available(),
        "torch": torch.__version__,
        "cupy": _importable("cupy"),
        "faiss": _importable("faiss"),
        "fused_cpu": cpu.available(),
        "fused_cpu_openmp": cpu.openmp(),
        "fused_cuda": cuda.cuda_backend(),
    }
