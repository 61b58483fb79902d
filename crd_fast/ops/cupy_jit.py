"""The CUDA kernels compiled at run time by CuPy (NVRTC), for installs whose ``_C`` has no CUDA kernels.

The source is the very file nvcc compiles into ``_C`` (csrc/cuda/crd_head_kernels.cuh, shipped in the
wheel; crd_fast/ops/kernel_config.py finds it), loaded as a ``cupy.RawModule`` and launched through its
C-linkage entry points (named by :class:`~crd_fast.ops.operands.Kernels`) with the same operands and checks as
the compiled launcher (:func:`launcher`, crd_fast/ops/cuda_launch.py). Optional extra: ``pip install crd-fast[cupy]``.

"Available" means "compiles": :func:`compile_error` builds the module once per device and remembers
the outcome, so a toolchain gap (e.g. CUDA header wheels without ``crt/mma.h``) makes this path
unavailable with a reason instead of raising mid-inference (docs/GPU.md).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import cuda_launch
from .kernel_config import config, source_path, source_text
from .operands import Kernels, Operands

#: Code-generation flags of both builds. CuPy always appends -ftz=true to NVRTC; the nvcc build of _C passes
#: the same list (CMakeLists.txt; tests/test_native.py checks they agree), so both backends round alike.
CODEGEN_FLAGS = ("-ftz=true", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")


def cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def available() -> bool:
    """True when CuPy imports and the kernel source is present (whether it compiles: :func:`compile_error`)."""
    return cupy_importable() and source_path() is not None


def nvrtc_options() -> tuple[str, ...]:
    """C++17, the shared code-generation flags, and the CUDA include directory where a complete one is found."""
    options = ["--std=c++17", *CODEGEN_FLAGS]
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


class _Modules:
    """Compiled modules per device index, and the error of a failed compile (remembered, not retried)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[int, tuple[Any, Optional[str]]] = {}

    def get(self, index: int) -> tuple[Any, Optional[str]]:
        with self._lock:
            if index in self._done:
                return self._done[index]
            try:
                module, error = build_module(index), None
            except Exception as exc:  # CompileException, missing headers or NVRTC: the path is unavailable
                module, error = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            self._done[index] = (module, error)
            return module, error

    def clear(self) -> None:
        with self._lock:
            self._done.clear()


def build_module(index: int) -> Any:
    """Compiles the kernel source for device ``index`` now (so a broken toolchain fails here, not mid-launch)."""
    import cupy

    with cupy.cuda.Device(index):
        module = cupy.RawModule(code=source_text(), options=nvrtc_options(), backend="nvrtc")
        module.compile()
    return module


MODULES = _Modules()


def compile_error(index: int) -> Optional[str]:
    """Why the kernels do not compile for device ``index`` (None: they do); compiled at most once per device."""
    if not cupy_importable():
        return "cupy is not installed (pip install crd-fast[cupy])"
    if source_path() is None:
        return "crd_head_kernels.cuh is missing from this install"
    return MODULES.get(index)[1]


def _module(index: int) -> Any:
    module, error = MODULES.get(index)
    if module is None:
        raise RuntimeError(f"the CuPy build of the kernels failed on device {index}: {error}")
    return module


def _tile_launch(ops: Operands, entry: str, dst: torch.Tensor) -> tuple[Any, int, int, Any]:
    """Launches tile kernel ``entry`` of the module on ``ops`` writing ``dst``; returns (module, N, tiles, index)."""
    import cupy

    cfg = config()
    batch, h0, w0, c_total, r = ops.sizes
    n = batch * h0 * w0
    device = ops.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    module = _module(index)

    def ptr(t: torch.Tensor) -> np.uint64:
        return np.uint64(t.data_ptr())

    maps = ops.maps
    f = [ptr(m) for m in maps] + [ptr(maps[0])] * (cfg.max_layers - len(maps))  # unused slots are never read
    tiles = cfg.tiles(r)
    with cupy.cuda.Device(index), _external_stream(ops, index):
        module.get_function(entry)(
            ((n + cfg.tile_p - 1) // cfg.tile_p, tiles),
            (cfg.threads,),
            (
                *f,
                np.int32(len(maps)),
                ptr(ops.plan),
                ptr(ops.weights),
                ptr(ops.matrix),
                ptr(ops.q),
                ptr(dst),
                np.int32(batch),
                np.int32(h0),
                np.int32(w0),
                np.int32(c_total),
                np.int32(r),
            ),
        )
    return module, n, tiles, index


def _external_stream(ops: Operands, index: int) -> Any:
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # CuPy 14 deprecates ExternalStream; it still works
        return cupy.cuda.ExternalStream(ops.stream(), index)


def _launch_cupy(
    kernels: Kernels, ops: Operands, out: torch.Tensor, partial: Optional[torch.Tensor], dtype: str
) -> None:
    """The tile kernel into ``partial`` and the finish kernel into ``out``, or the tile kernel straight into ``out``."""
    import cupy

    module, n, tiles, index = _tile_launch(ops, kernels.tile_entry(dtype), out if partial is None else partial)
    if partial is None:
        return
    cfg = config()
    with cupy.cuda.Device(index), _external_stream(ops, index):
        module.get_function(kernels.finish_entry(dtype))(
            ((n + cfg.finish_threads - 1) // cfg.finish_threads,),
            (cfg.finish_threads,),
            (np.uint64(partial.data_ptr()), np.uint64(out.data_ptr()), np.int64(n), np.int32(tiles)),
        )


def _import_cupy(kernels: Kernels) -> None:
    import cupy  # noqa: F401 - ImportError here, before any argument check, when the extra is missing


def launcher(kernels: Kernels) -> cuda_launch.Launcher:
    """The launcher of ``kernels`` through CuPy: the contract of crd_fast/ops/cuda_launch.py, NVRTC-built kernels."""
    return cuda_launch.launcher(
        kernels,
        _launch_cupy,
        _import_cupy,
        "cupy",
        f"""{kernels.name} through the CuPy (NVRTC) build of the kernels; fills and returns ``out``.""",
    )
