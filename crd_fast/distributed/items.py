"""The full, ordered list of inputs that every rank shards (the same list on every rank)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from ..data.images import list_image_files


def as_item_list(items: Any) -> Sequence[Any]:
    """A folder becomes its sorted image files; a (B, 3, H, W) tensor its B images; sequences stay."""
    if isinstance(items, (str, os.PathLike)):
        if os.path.isdir(items):
            return list_image_files(items)
        return [os.fspath(items)]
    if isinstance(items, torch.Tensor):
        return list(items.unsqueeze(0) if items.ndim == 3 else items)
    return items


def check_items(items: Any) -> Sequence[Any]:
    """``items`` must be indexable with a length (list, tuple, data set): each rank picks its shard by index."""
    if isinstance(items, (str, bytes)) or not (hasattr(items, "__len__") and hasattr(items, "__getitem__")):
        raise TypeError(
            f"items must be a list, tuple or data set of inputs (indexable, with a length), got {type(items).__name__}"
        )
    return items
