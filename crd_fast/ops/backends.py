"""``crd_fast.backends()``: what this installation can run, and which path the fused head takes per device."""

from __future__ import annotations

from typing import Any

import torch

from . import cpu, cuda_dispatch, cupy_jit, native, registry


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:
        return False
    return True


def backends() -> dict[str, Any]:
    """What this installation can run: native CPU kernels, compiled CUDA kernels, GPUs, CuPy, faiss.

    ``fused_cpu_bf16_isa`` names the instruction set the CPU pass over bf16 projections runs here (None: not
    built). ``cuda_devices`` lists, per visible GPU, the path ``crd_fast.ops.crd_head`` takes there and why, with
    each other op's under its name (e.g. "crd_residual"); the first call decides it: kernels are probed once per
    op and device (docs/GPU.md).
    """
    info = native.build_info()
    return {
        "native": native.has_native(),
        "native_error": native.import_error(),
        "openmp": bool(info.get("openmp", False)),
        "cuda_kernels": native.has_native_cuda(),
        "cuda_kernels_version": info.get("cuda_version"),
        "cuda_kernels_archs": info.get("cuda_archs"),
        "cuda_device": torch.cuda.is_available(),
        "cuda_devices": cuda_dispatch.device_report([s for s in registry.OPS.values() if s.kernels is not None]),
        "torch": torch.__version__,
        "cupy": cupy_jit.cupy_importable(),
        "faiss": _importable("faiss"),
        "fused_cpu": cpu.available(),
        "fused_cpu_openmp": cpu.openmp(),
        "fused_cpu_bf16_isa": cpu.bf16_isa(),
    }
