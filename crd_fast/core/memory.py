"""Hand the C heap's free memory back to the operating system (glibc's ``malloc_trim``), where there is one.

torch's CPU tensors below glibc's mmap threshold (which grows to 32 MB as large blocks are freed) come from the
heap, and freed heap memory stays resident: after the forward passes of a fit, a few hundred MB of it (on the
machine of bench/RESULTS.md, 300 MB after 200 images with wide_resnet50_2 at 224 px). The label-free choice calls
:func:`release_free_memory` before it builds its candidates, so their memory does not come on top of it
(docs/DESIGN.md "The detector's choice of spatial model and lam_rel"). Elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any, Optional

_libc: Optional[Any] = None
_looked = False


def _malloc_trim() -> Optional[Any]:
    global _libc, _looked
    if not _looked:
        _looked = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _libc = libc if hasattr(libc, "malloc_trim") else None
            except OSError:
                _libc = None
    return _libc


def release_free_memory() -> bool:
    """Return the heap's free memory to the operating system; True when glibc did (nothing to do elsewhere)."""
    libc = _malloc_trim()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


__all__ = ["release_free_memory"]
