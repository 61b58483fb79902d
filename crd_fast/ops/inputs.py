"""Input checks shared by the ops on feature maps (crd_head, crd_residual): shapes only, so safe on fake tensors.

Every op of this family takes ``(feature_maps, matrix, second, embedding, target_dim)``: (B, C_l, H_l, W_l) maps on
one device in one dtype, an (r, d) matrix with d the embedding's dimension, and a third operand whose shape is the
op's own (crd_head: the (d,) offset; crd_residual: the (H_0 W_0, r) per-position q), checked by the op's
``check_second``. Each error names the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

from ..core.embedding import check_embedding, embedding_dim

MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: ``check_second(second, first_map, matrix, d)``: raises ValueError when the op's third operand has a wrong shape.
CheckSecond = Callable[[Tensor, Tensor, Tensor, int], None]


def check_inputs(
    feature_maps: Sequence[Tensor],
    matrix: Tensor,
    second: Tensor,
    embedding: str,
    target_dim: int,
    second_name: str,
    check_second: CheckSecond,
) -> None:
    """Refuses malformed op inputs with an error naming the problem; ``second_name`` names the third operand."""
    if not isinstance(feature_maps, (list, tuple)) or len(feature_maps) == 0:
        raise ValueError("feature_maps must be a non-empty list of (B, C, H, W) tensors")
    check_embedding(embedding)
    if isinstance(target_dim, bool) or not isinstance(target_dim, int) or target_dim < 1:
        raise ValueError(f"target_dim must be a positive integer, got {target_dim!r}")
    first = feature_maps[0]
    for i, f in enumerate(feature_maps):
        if not isinstance(f, Tensor):
            raise TypeError(f"feature map {i} is a {type(f).__name__}, not a tensor")
        if f.ndim != 4:
            raise ValueError(f"feature map {i} must be 4-D (B, C, H, W), got shape {tuple(f.shape)}")
        if f.dtype not in MAP_DTYPES:
            raise TypeError(f"feature map {i} has dtype {f.dtype}; expected one of {MAP_DTYPES}")
        if f.dtype != first.dtype:
            raise TypeError(f"feature maps must share one dtype: map 0 is {first.dtype}, map {i} is {f.dtype}")
        if f.device != first.device:
            raise ValueError(f"feature maps must be on one device: map 0 is on {first.device}, map {i} on {f.device}")
        if f.shape[0] != first.shape[0]:
            raise ValueError(
                f"feature maps must share the batch size: map 0 has {first.shape[0]}, map {i} has {f.shape[0]}"
            )
        if f.shape[1] < 1 or f.shape[2] < 1 or f.shape[3] < 1:
            raise ValueError(f"feature map {i} has an empty channel or spatial dimension: {tuple(f.shape)}")
    d = embedding_dim([f.shape[1] for f in feature_maps], embedding, target_dim)
    for name, t in (("matrix", matrix), (second_name, second)):
        _check_operand(name, t, first.device)
    if matrix.ndim != 2 or matrix.shape[1] != d:
        raise ValueError(
            f"matrix must be (r, d) with d={d} for the {embedding!r} embedding of layers "
            f"{[int(f.shape[1]) for f in feature_maps]}, got shape {tuple(matrix.shape)}"
        )
    check_second(second, first, matrix, d)


def _check_operand(name: str, t: Tensor, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the feature maps are on {device}")
