"""Limits on image input (torch-free): size checked from the header before decoding, and a memory budget
that bounds how many images are decoded at once.

- ``max_pixels`` (default 50 megapixels): larger images are refused before any pixel is decoded, so a small
  file that claims a huge size (a decompression bomb) costs nothing;
- ``max_aspect`` (default 32): the longer side may be at most this many times the shorter one; resizing the
  shorter side of a 1 x 8000 strip to ``resize`` would otherwise make a picture thousands of times larger;
- the decode budget (default 2 GiB): threads that decode images in parallel first reserve an estimate of the
  memory one image needs (``BYTES_PER_PIXEL`` per pixel), so a batch of large images is decoded a few at a
  time, not all at once. One image larger than the whole budget is decoded alone.

All three are configurable: :func:`set_image_limits` in Python, or the environment variables
``CRD_FAST_MAX_IMAGE_PIXELS``, ``CRD_FAST_MAX_IMAGE_ASPECT`` and ``CRD_FAST_DECODE_MEMORY`` (bytes).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_ASPECT = 32.0
DEFAULT_DECODE_MEMORY = 2 << 30
#: Peak bytes per source pixel while one image is decoded and preprocessed: 3 (RGB uint8) + up to 3 more while
#: the mode is converted or EXIF-rotated + 12 (float32 RGB) + 12 (the antialiased resize's intermediate).
BYTES_PER_PIXEL = 30


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"environment variable {name}={text!r} must be positive")
    return value


@dataclass
class ImageLimits:
    """The limits in force (see the module docstring)."""

    max_pixels: int
    max_aspect: float
    decode_memory: int


_limits = ImageLimits(
    int(_env_number("CRD_FAST_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS)),
    _env_number("CRD_FAST_MAX_IMAGE_ASPECT", DEFAULT_MAX_ASPECT),
    int(_env_number("CRD_FAST_DECODE_MEMORY", DEFAULT_DECODE_MEMORY)),
)


def image_limits() -> ImageLimits:
    """The limits in force now."""
    return _limits


def set_image_limits(
    max_pixels: Optional[int] = None, max_aspect: Optional[float] = None, decode_memory: Optional[int] = None
) -> ImageLimits:
    """Change the limits for this process (None keeps a value); returns the previous ones."""
    global _limits
    before = ImageLimits(_limits.max_pixels, _limits.max_aspect, _limits.decode_memory)
    for name, value in (("max_pixels", max_pixels), ("max_aspect", max_aspect), ("decode_memory", decode_memory)):
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
    _limits = ImageLimits(
        int(max_pixels if max_pixels is not None else _limits.max_pixels),
        float(max_aspect if max_aspect is not None else _limits.max_aspect),
        int(decode_memory if decode_memory is not None else _limits.decode_memory),
    )
    _budget.resize(_limits.decode_memory)
    return before


def size_problem(width: int, height: int) -> Optional[str]:
    """Why an image of ``width`` x ``height`` is refused, or None if it is within the limits."""
    if width < 1 or height < 1:
        return f"it has no pixels ({width}x{height})"
    limits = _limits
    if width * height > limits.max_pixels:
        return (
            f"{width}x{height} = {width * height / 1e6:.1f} megapixels exceeds the limit of "
            f"{limits.max_pixels / 1e6:g} (raise it with CRD_FAST_MAX_IMAGE_PIXELS or set_image_limits)"
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        return (
            f"{width}x{height} has an aspect ratio above the limit of {limits.max_aspect:g}:1 "
            "(raise it with CRD_FAST_MAX_IMAGE_ASPECT or set_image_limits)"
        )
    return None


class MemoryBudget:
    """A counting semaphore in bytes: ``reserve(n)`` blocks until ``n`` bytes are free (a request larger than
    the whole budget waits until nothing else is reserved, then runs alone)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.in_use = 0
        self._cond = threading.Condition()

    def resize(self, capacity: int) -> None:
        with self._cond:
            self.capacity = int(capacity)
            self._cond.notify_all()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            need = min(int(nbytes), self.capacity)
            self._cond.wait_for(lambda: self.in_use == 0 or self.in_use + need <= self.capacity)
            self.in_use += need
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= need
                self._cond.notify_all()


_budget = MemoryBudget(_limits.decode_memory)


def decode_budget() -> MemoryBudget:
    """The process-wide budget that parallel image decoding reserves from."""
    return _budget
