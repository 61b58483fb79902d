"""Torch tensors recognised without importing torch, for the torch-free modules (metrics, reports, ONNX runtime).

A tensor is anything with ``detach``, ``cpu`` and ``numpy`` (duck typing): these modules accept tensors from
callers that have torch, and still import on machines without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_tensor_like", "numpy_if_tensor"]


def is_tensor_like(x: Any) -> bool:
    """True for torch tensors (and look-alikes), found without importing torch."""
    return hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy")


def numpy_if_tensor(x: Any) -> Any:
    """A tensor (any device) as a numpy array on the host; anything else unchanged."""
    return x.detach().cpu().numpy() if is_tensor_like(x) else x
