"""Input checking and conversion shared by every public entry point.

Users hand in torch tensors or numpy arrays; results go back in the same kind and, for tensors, on the
same device. Bad input is refused here with an error that names the problem, before any math runs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

# Defined in core (its statistics raise it too); re-exported here, where the scorers import it from.
from ..core.dtypes import NumericOverflowError  # noqa: F401
from ..core.finite import all_finite

ArrayLike = Union[torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class ArrayKind:
    """Remembers how an input came in, so the output can go back the same way."""

    is_numpy: bool
    device: torch.device
    dtype: torch.dtype

    def wrap(self, result: torch.Tensor) -> ArrayLike:
        """Return ``result`` as the caller's kind: a numpy array, or a tensor on the caller's device."""
        if self.is_numpy:
            return result.detach().cpu().numpy()
        return result.to(self.device)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor(x: Any, name: str = "input") -> tuple[torch.Tensor, ArrayKind]:
    """Convert a tensor, numpy array (or nested sequence) to a tensor, refusing non-float data."""
    if isinstance(x, torch.Tensor):
        tensor, is_numpy = x.detach(), False
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "f":
            raise TypeError(f"{name} must have a floating-point dtype, got numpy {x.dtype}")
        tensor, is_numpy = torch.from_numpy(np.ascontiguousarray(x)), True
    elif isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if arr.dtype.kind not in "f":
            raise TypeError(f"{name} must hold floating-point values, got {arr.dtype}")
        tensor, is_numpy = torch.from_numpy(arr), True
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point dtype (float16/bfloat16/float32/float64), got {tensor.dtype}"
        )
    return tensor, ArrayKind(is_numpy=is_numpy, device=tensor.device, dtype=tensor.dtype)


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise ValueError if ``t`` holds NaN or Inf (one reduction; cheap next to any matmul)."""
    if not all_finite(t):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def as_patch_matrix(
    x: Any,
    name: str = "X",
    dim: Optional[int] = None,
    min_rows: int = 1,
) -> tuple[torch.Tensor, ArrayKind]:
    """Check a (N, d) patch matrix: 2-D, float, finite, at least ``min_rows`` rows, ``dim`` columns."""
    tensor, kind = as_tensor(x, name)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) array of patch features, got shape {tuple(tensor.shape)}")
    n, d = tensor.shape
    if n < min_rows:
        what = "is empty" if n == 0 else f"has {n} row(s)"
        raise ValueError(f"{name} {what}; at least {min_rows} patch(es) are needed")
    if d == 0:
        raise ValueError(f"{name} has zero feature dimensions (shape {tuple(tensor.shape)})")
    if dim is not None and d != dim:
        raise ValueError(f"{name} has feature dimension d={d}, but the model was fitted with d={dim}")
    check_finite(tensor, name)
    return tensor, kind


def as_patch_grids(
    x: Any,
    name: str = "grids",
    positions: Optional[int] = None,
    dim: Optional[int] = None,
    min_images: int = 1,
) -> tuple[torch.Tensor, ArrayKind]:
    """Check (B, P, d) patch grids (one row of P positions per image): 3-D, float, finite, at least
    ``min_images`` images, ``positions`` and ``dim`` as given (when not None)."""
    tensor, kind = as_tensor(x, name)
    if tensor.ndim != 3:
        raise ValueError(
            f"{name} must be a 3-D (images, positions, d) array of patch grids, got shape {tuple(tensor.shape)}"
        )
    b, p, d = tensor.shape
    if b < min_images:
        what = "has no images" if b == 0 else f"has {b} image(s)"
        raise ValueError(f"{name} {what}; at least {min_images} are needed")
    if p == 0 or d == 0:
        raise ValueError(f"{name} has no positions or zero feature dimensions (shape {tuple(tensor.shape)})")
    if positions is not None and p != positions:
        raise ValueError(f"{name} has {p} positions per image, but the model was fitted with {positions}")
    if dim is not None and d != dim:
        raise ValueError(f"{name} has feature dimension d={d}, but the model was fitted with d={dim}")
    check_finite(tensor, name)
    return tensor, kind


# ---- numeric parameters -----------------------------------------------------------------------------
def check_real(name: str, value: Any, minimum: Optional[float] = None, positive: bool = False) -> float:
    """A finite real parameter (Python or numpy number; bool refused) as a Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    result = float(value)
    if not math.isfinite(result) or (positive and not result > 0) or (minimum is not None and result < minimum):
        need = "a positive finite number" if positive else "a finite number"
        if minimum is not None:
            need += f" >= {minimum:g}"
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return result


def check_integer(name: str, value: Any, minimum: int) -> int:
    """An integer parameter (Python or numpy integer; bool refused) >= ``minimum``, as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """A flag: True or False only (numpy's too); ``center="no"`` is truthy and would silently mean True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)
