"""One fast test for NaN and Inf, used by every input check and overflow check on the hot paths.

``torch.isfinite(t).all()`` materialises a bool tensor as large as ``t`` and then reduces it: 40.8 ms on one
fit batch's (6272, 1536) float32 patches on two cores, against 3.0 ms for ``torch.aminmax``, whose min and
max propagate NaN and expose +-Inf as an extreme (``python -m pytest bench/suites/bench_scatter.py -s``;
bench/RESULTS.md).
Torch-only, no other crd_fast import.
"""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of ``t`` is NaN or +-Inf (integer and bool tensors always are; empty ones too)."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    try:
        lo, hi = torch.aminmax(t)
    except (RuntimeError, NotImplementedError):  # a dtype or device without aminmax: the plain test
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
