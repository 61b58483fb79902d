"""The CUDA kernels' launch geometry, read from the one place it is written: csrc/cuda/crd_head_kernels.cuh.

nvcc compiles that file into ``_C`` and NVRTC (CuPy) compiles the same file at run time; Python reads its
``constexpr int kName = value;`` lines here, so tile sizes, thread counts and the layer limit exist once.
The file ships in the wheel beside this module (CMakeLists.txt installs it in every configuration).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SOURCE_NAME = "crd_head_kernels.cuh"
_CONSTANT = re.compile(r"^\s*constexpr\s+int\s+(k\w+)\s*=\s*(\d+)\s*;", re.MULTILINE)


def source_path() -> Optional[Path]:
    """The kernel source: installed beside this module (wheel) or in the source tree (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / SOURCE_NAME, here.parent.parent / "csrc" / "cuda" / SOURCE_NAME):
        if candidate.is_file():
            return candidate
    return None


def source_text() -> str:
    """The kernel source text; FileNotFoundError when it is neither installed nor in the source tree."""
    path = source_path()
    if path is None:
        raise FileNotFoundError(f"{SOURCE_NAME} is neither installed in crd_fast/ops nor in csrc/cuda")
    return path.read_text()


@dataclass(frozen=True)
class KernelConfig:
    """Launch geometry of the fused head kernels (names as in the .cuh without the ``k``)."""

    max_layers: int  #: kMaxLayers: feature maps one launch takes
    header: int  #: kHeader: ints per layer header in the plan table
    max_taps: int  #: kMaxTaps: taps per band row of the plan
    threads: int  #: kThreads: threads per tile block
    tile_p: int  #: kTileP: patches per block (grid x)
    tile_r: int  #: kTileR: projection rows per block (grid y)
    finish_threads: int  #: kFinishThreads: threads per block of the finish kernel
    bf16_min_arch: int  #: kBf16MinArch: 10 * major + minor below which the bf16 tile kernel is a stub

    def tiles(self, rank: int) -> int:
        """Row tiles of a rank-``rank`` matrix: the first dimension of the ``partial`` scratch."""
        return (int(rank) + self.tile_r - 1) // self.tile_r


def parse(text: str) -> KernelConfig:
    """The :class:`KernelConfig` written in kernel source ``text``; ValueError naming any missing constant."""
    found = {name: int(value) for name, value in _CONSTANT.findall(text)}
    fields = {
        "max_layers": "kMaxLayers",
        "header": "kHeader",
        "max_taps": "kMaxTaps",
        "threads": "kThreads",
        "tile_p": "kTileP",
        "tile_r": "kTileR",
        "finish_threads": "kFinishThreads",
        "bf16_min_arch": "kBf16MinArch",
    }
    missing = [c for c in fields.values() if c not in found]
    if missing:
        raise ValueError(f"{SOURCE_NAME} does not define {missing}")
    values = {f: found[c] for f, c in fields.items()}
    values["bf16_min_arch"] //= 10  # the .cuh writes __CUDA_ARCH__ units (800); Python compares 10*major+minor
    return KernelConfig(**values)


def load() -> Optional[KernelConfig]:
    """The shipped source's configuration, or None when the source is missing (no CUDA path can run then)."""
    path = source_path()
    return parse(path.read_text()) if path is not None else None


#: The configuration of the installed kernel source (None only in a broken install without the .cuh).
CONFIG: Optional[KernelConfig] = load()


def config() -> KernelConfig:
    """The kernels' launch geometry; RuntimeError when the kernel source is not installed."""
    if CONFIG is None:
        raise RuntimeError(f"{SOURCE_NAME} is missing from this install: no CUDA kernel can run")
    return CONFIG
