"""The fused head kernels compiled at run time by CuPy (NVRTC), for installs whose ``_C`` has no CUDA.

The source is the very file nvcc compiles into ``_C`` (csrc/cuda/crd_head_kernels.cuh, shipped in the
wheel next to this module), loaded as a ``cupy.RawModule`` and launched through its C-linkage entry
points with the same arguments as the compiled launcher (csrc/cuda/crd_head.cu). Optional extra:
``pip install crd-fast[cupy]``.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import native as _native
from . import cuda_launch

SOURCE_NAME = "crd_head_kernels.cuh"
TILE_P = 64  # crd_head::kTileP
TILE_R = 64  # crd_head::kTileR
THREADS = 256  # crd_head::kThreads
_ENTRY = {"float32": "crd_head_tile_f32", "float64": "crd_head_tile_f64", "float16": "crd_head_tile_f16", "bfloat16": "crd_head_tile_bf16"}


def source_path() -> Optional[Path]:
    """The kernel source: installed beside this module (wheel) or in the source tree (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / SOURCE_NAME, here.parent.parent / "csrc" / "cuda" / SOURCE_NAME):
        if candidate.is_file():
            return candidate
    return None


def source_text() -> str:
    path = source_path()
    if path is None:
        raise FileNotFoundError(f"{SOURCE_NAME} is neither installed in crd_fast/ops nor in csrc/cuda")
    return path.read_text()


def cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def available() -> bool:
    """True when CuPy imports and the kernel source is present (whether or not a GPU is)."""
    return cupy_importable() and source_path() is not None


def nvrtc_options() -> tuple[str, ...]:
    """C++17, plus the CUDA include directory (cuda_fp16.h, cuda_bf16.h, mma.h) where it can be found."""
    options = ["--std=c++17"]
    roots = []
    try:
        import cupy

        roots.append(cupy.cuda.get_cuda_path())
    except Exception:
        pass
    roots += [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for root in roots:
        # a complete toolkit include tree: pip's header wheels can lack crt/mma.h (wmma)
        inc = Path(root) / "include" if root else None
        if inc and (inc / "cuda_fp16.h").is_file() and (inc / "crt" / "mma.h").is_file():
            options.append(f"-I{inc}")
            break
    return tuple(options)


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source_text(), options=nvrtc_options(), backend="nvrtc")
        module.compile()  # compile now, so a broken toolchain fails here and not mid-launch
    return module


def _launch_cupy(launch: cuda_launch.HeadLaunch) -> None:
    import cupy

    batch, h0, w0, c_total, r = launch.sizes
    n = batch * h0 * w0
    device = launch.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    module = _module(index)
    ptr = lambda t: np.uint64(t.data_ptr())  # noqa: E731 - kernel pointer parameters are 8-byte values
    maps = launch.maps
    f = [ptr(m) for m in maps] + [ptr(maps[0])] * (4 - len(maps))  # unused slots are never read
    tiles = (r + TILE_R - 1) // TILE_R
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # CuPy 14 deprecates ExternalStream; it still works
        external = cupy.cuda.ExternalStream(launch.stream(), index)
    with cupy.cuda.Device(index), external:
        module.get_function(_ENTRY[launch.dtype])(
            ((n + TILE_P - 1) // TILE_P, tiles),
            (THREADS,),
            (*f, np.int32(len(maps)), ptr(launch.plan), ptr(launch.weights), ptr(launch.matrix), ptr(launch.q),
             ptr(launch.partial), np.int32(batch), np.int32(h0), np.int32(w0), np.int32(c_total), np.int32(r)),
        )
        finish = "crd_head_finish_f64" if launch.dtype == "float64" else "crd_head_finish_f32"
        module.get_function(finish)(
            ((n + 255) // 256,), (256,), (ptr(launch.partial), ptr(launch.out), np.int64(n), np.int32(tiles))
        )


def _import_cupy() -> None:
    import cupy  # noqa: F401 - ImportError here, before any argument check, when the extra is missing


crd_head_cupy = cuda_launch.head_launcher(
    _launch_cupy, _import_cupy, "crd_head_cupy",
    """Same contract as ``crd_fast.ops.native.crd_head_cuda``, through CuPy; fills and returns ``out``.""",
)
