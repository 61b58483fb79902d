"""Turn the many ways users hand over images into one stream of (path or None, image).

The logic lives in the torch-free :mod:`crd_fast.io.images` (shared with the ONNX runtime); this module keeps
the names the PyTorch pipeline imports and adds :func:`count_images`. See :func:`crd_fast.io.images.iter_images`
for the accepted inputs. Paths are not opened here: the consumer loads them (so loading can run in parallel
with the model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from ..io.images import ImageItem, iter_images, list_image_files

__all__ = ["ImageItem", "Images", "count_images", "iter_images", "list_image_files"]

Images = Union[str, os.PathLike, Iterable[Any], torch.Tensor]


def count_images(images: Images) -> Optional[int]:
    """How many images ``iter_images`` will yield, when that is known without reading them."""
    if isinstance(images, torch.Tensor):
        return 1 if images.ndim == 3 else int(images.shape[0])
    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        return len(list_image_files(p)) if p.is_dir() else 1
    try:
        return len(images)  # type: ignore[arg-type]
    except TypeError:
        return None
