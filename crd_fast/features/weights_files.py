"""Backbone weights files: their identity (SHA-256) and their state dicts, read without unpickling.

Shared by every backbone family (crd_fast/features/backbone.py, efficientnet_lite.py, timm_backbone.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

import torch

from .errors import BackboneWeightsError

WeightsSpec = Union[str, os.PathLike]


def file_sha256(path: WeightsSpec) -> str:
    """SHA-256 of a file's bytes (the identity of a local weights file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: WeightsSpec) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or torch file without unpickling arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise BackboneWeightsError(
            f"weights file {str(p)!r} does not exist (weights must be 'imagenet', 'random' or a file path)"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneWeightsError(f"{p}: not a readable state-dict file (safetensors or torch .pth): {exc}") from exc
    # Common checkpoint wrappers: {"state_dict": {...}} or {"model": {...}}.
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{p}: does not hold a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}
