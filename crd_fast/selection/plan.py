"""Which training images the label-free choice holds out, and when it cannot choose (torch-free).

The fit holds out a few training images (:class:`HeldOutPlan`) to validate the candidate models on; with too few
images there is nothing to hold out and the defaults apply (:func:`fallback_reason`). docs/DESIGN.md "The
detector's choice of spatial model and lam_rel".
"""

from __future__ import annotations

from typing import Optional

#: Fewer training images than this: no hold-out, no selection (spatial "global", lam_rel DEFAULT_LAM_REL).
MIN_IMAGES = 20
#: Held-out images: min(MAX_HELD_OUT, N // 5), and at least MIN_HELD_OUT.
MAX_HELD_OUT = 24
MIN_HELD_OUT = 4
#: When the number of images is not known up front, every STREAM_STRIDE-th image is held out (up to MAX_HELD_OUT).
STREAM_STRIDE = 8


def held_out_count(n_images: int) -> int:
    """How many of ``n_images`` (>= MIN_IMAGES) training images are held out."""
    return max(MIN_HELD_OUT, min(MAX_HELD_OUT, n_images // 5))


class HeldOutPlan:
    """Which training images (by their position in the stream) are held out for the selection.

    With the count known: ``held_out_count(count)`` positions evenly spaced over the stream (none below
    MIN_IMAGES). Unknown: every STREAM_STRIDE-th image, up to MAX_HELD_OUT.
    """

    def __init__(self, count: Optional[int]) -> None:
        self.count = count
        self.held = 0
        self._positions: Optional[frozenset[int]] = None
        if count is not None:
            if count < MIN_IMAGES:
                self._positions = frozenset()
            else:
                h = held_out_count(count)
                self._positions = frozenset(((2 * i + 1) * count) // (2 * h) for i in range(h))

    def take(self, position: int) -> bool:
        """Whether the image at stream ``position`` is held out (call once per image, in order)."""
        if self._positions is not None:
            hold = position in self._positions
        else:
            hold = position % STREAM_STRIDE == STREAM_STRIDE - 1 and self.held < MAX_HELD_OUT
        self.held += int(hold)
        return hold


def fallback_reason(n_images: int, held: int) -> Optional[str]:
    """Why no selection can be made with ``n_images`` training images, ``held`` of them held out (None: it can)."""
    if n_images < MIN_IMAGES:
        return f"only {n_images} training images (fewer than {MIN_IMAGES}): no hold-out, no selection"
    if held < MIN_HELD_OUT:
        return f"only {held} images held out (fewer than {MIN_HELD_OUT}): no selection"
    return None


__all__ = [
    "MAX_HELD_OUT",
    "MIN_HELD_OUT",
    "MIN_IMAGES",
    "STREAM_STRIDE",
    "HeldOutPlan",
    "fallback_reason",
    "held_out_count",
]
