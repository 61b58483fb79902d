"""Turn the many ways users hand over images into one stream of (path or None, image).

Accepted ``images``:

- a folder (str or Path): its image files (by extension, see ``IMAGE_EXTENSIONS``), sorted by name;
- one image file path;
- a list/tuple of paths, PIL images, numpy arrays or (3, H, W) tensors (mixed is fine);
- a tensor batch (B, 3, H, W) (or one (3, H, W) image), float in [0, 1] or uint8, any device;
- a dataset object: anything with ``__len__``/``__getitem__`` or iterable, whose items are paths, images,
  ``Sample``-like objects with an ``image_path`` attribute, dicts with "image_path"/"path"/"image", or
  tuples whose first element is one of those (as torchvision's ImageFolder returns).

Paths are not opened here: the consumer loads them (so loading can run in parallel with the model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image

from ..features.preprocess import IMAGE_EXTENSIONS

#: One item of the stream: the file path (None for in-memory images) and the image itself
#: (a path to load, a PIL image, a numpy array or a (3, H, W) tensor).
ImageItem = tuple[Optional[str], Any]
Images = Union[str, os.PathLike, Iterable[Any], torch.Tensor]


def list_image_files(folder: Union[str, os.PathLike], recursive: bool = False) -> list[str]:
    """Image files in ``folder`` (by extension, case-insensitive), sorted; FileNotFoundError if it is not a folder."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    pattern = root.rglob("*") if recursive else root.iterdir()
    files = sorted(str(p) for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return files


def _item(obj: Any, where: str) -> ImageItem:
    """Resolve one element of a list or data set to (path or None, image)."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj), os.fspath(obj)
    if isinstance(obj, (Image.Image, np.ndarray)):
        return None, obj
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 4 and obj.shape[0] == 1:
            obj = obj[0]
        return None, obj
    path = getattr(obj, "image_path", None)
    if path is not None:
        return os.fspath(path), os.fspath(path)
    if isinstance(obj, dict):
        for key in ("image_path", "path"):
            if obj.get(key) is not None:
                return os.fspath(obj[key]), os.fspath(obj[key])
        if "image" in obj:
            return _item(obj["image"], where)
    if isinstance(obj, (tuple, list)) and obj:
        return _item(obj[0], where)
    raise TypeError(f"{where}: cannot use an item of type {type(obj).__name__} as an image "
                    "(expected a path, PIL image, numpy array, tensor or an object with image_path)")


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


def iter_images(images: Images) -> Iterator[ImageItem]:
    """Yield (path or None, image) for every image in ``images`` (see the module docstring)."""
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"an image tensor must be (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
        for i in range(batch.shape[0]):
            yield None, batch[i]
        return
    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        if p.is_dir():
            files = list_image_files(p)
            if not files:
                raise ValueError(f"image folder {str(p)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            for f in files:
                yield f, f
        elif p.exists():
            yield str(p), str(p)
        else:
            raise FileNotFoundError(f"{str(p)!r} is neither an image file nor a folder")
        return
    if isinstance(images, (Image.Image, np.ndarray)):
        yield None, images
        return
    if hasattr(images, "__getitem__") and hasattr(images, "__len__") and not isinstance(images, (list, tuple)):
        name = type(images).__name__
        for i in range(len(images)):
            yield _item(images[i], f"{name}[{i}]")
        return
    try:
        iterator = iter(images)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"images must be a folder, a file, a list of images or paths, a tensor batch or a data set; "
                        f"got {type(images).__name__}") from None
    for i, obj in enumerate(iterator):
        yield _item(obj, f"images[{i}]")
