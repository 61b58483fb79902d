"""The precision rule of scoring, written once: float64 inputs are scored in float64, everything else in float32;
and the error raised when values overflow the precision in use.

Used by the scorers (crd_fast/scorers), the fused head op's output dtype and the CUDA kernels' accumulation
dtype (crd_fast/ops). Torch-only, no other crd_fast import.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scoring runs (and accumulates) in for inputs of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class NumericOverflowError(ValueError):
    """Values too large for the floating-point precision in use: sums of squares overflowed to Inf."""
