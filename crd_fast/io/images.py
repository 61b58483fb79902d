"""Torch-free image input shared by the PyTorch pipeline and the ONNX runtime: numpy and PIL only.

- ``IMAGENET_MEAN`` / ``IMAGENET_STD``: the normalisation both preprocessing paths use;
- :func:`load_image` / :func:`to_rgb`: decode a file (any PIL mode) as 8-bit RGB;
- :func:`list_image_files` / :func:`iter_images`: turn the many ways users hand over images into one stream
  of (path or None, image).

Accepted ``images`` for :func:`iter_images`:

- a folder (str or Path): its image files (by extension, see ``IMAGE_EXTENSIONS``), sorted by name;
- one image file path;
- a list/tuple of paths, PIL images, numpy arrays or (3, H, W) tensors (mixed is fine);
- a tensor batch (B, 3, H, W) (or one (3, H, W) image), float in [0, 1] or uint8, any device;
- a dataset object: anything with ``__len__``/``__getitem__`` or iterable, whose items are paths, images,
  ``Sample``-like objects with an ``image_path`` attribute, dicts with "image_path"/"path"/"image", or
  tuples whose first element is one of those (as torchvision's ImageFolder returns).

Tensors are recognised by duck typing (``detach``/``cpu``/``numpy``), so this module never imports torch:
``crd_fast.deploy`` uses it on machines without torch. Paths are not opened by :func:`iter_images`: the
consumer loads them (so loading can run in parallel with the model).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageOps

from .limits import BYTES_PER_PIXEL, decode_budget, image_limits, size_problem
from .safety import TEMP_PREFIX
from .tensors import is_tensor_like

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: One item of the stream: the file path (None for in-memory images) and the image itself
#: (a path to load, a PIL image, a numpy array or a (3, H, W) tensor).
ImageItem = tuple[Optional[str], Any]


class ImageReadError(OSError):
    """An image file could not be read or decoded; the message names the file."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: grayscale is replicated, alpha dropped, palettes expanded,
    16-bit (and 32-bit integer) grayscale scaled from its full range to 0..255."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # PNG 16-bit grayscale opens as I;16 (or I in older Pillow): its range is 0..65535.
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: Union[str, os.PathLike], error: type[Exception] = ImageReadError) -> Image.Image:
    """Open an image file as 8-bit RGB, upright (its EXIF orientation applied); raise ``error`` (default
    :class:`ImageReadError`) naming the file if it cannot be read or decoded, or if its header gives a size
    beyond the limits of :mod:`crd_fast.io.limits` (checked before any pixel is decoded). The ONNX runtime
    passes its own ValueError subclass."""
    _defer_pillow_limit()
    try:
        with Image.open(path) as img:
            problem = size_problem(*img.size)
            if problem is not None:
                raise error(f"cannot read image {os.fspath(path)!r}: refused before decoding: {problem}")
            img.load()  # decode now, inside the try, so truncated files fail here
            return to_rgb(ImageOps.exif_transpose(img))
    except error:
        raise
    except Exception as exc:  # Pillow's decoders raise many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise error(f"cannot read image {os.fspath(path)!r}: {_read_failure(exc)}") from exc


def _defer_pillow_limit() -> None:
    """Let crd_fast's own pixel limit decide (crd_fast.io.limits, checked from the header before decoding): Pillow
    refuses images above 2 x ``Image.MAX_IMAGE_PIXELS`` (179 MP by default) while opening them, so a larger limit
    set by the user would otherwise have no effect. Pillow's limit is raised only as far as ours."""
    ours = image_limits().max_pixels
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow is not None and ours > pillow:
        Image.MAX_IMAGE_PIXELS = ours  # Pillow errors at twice this and warns above it: ours speaks first


def _read_failure(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    return f"{type(exc).__name__}: {exc}"


def image_size(path: Union[str, os.PathLike]) -> Optional[tuple[int, int]]:
    """(width, height) from the file's header without decoding it; None if the header cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # load_image reports the problem properly
        return None


@contextlib.contextmanager
def decode_reservation(path: Union[str, os.PathLike]) -> Iterator[None]:
    """Hold a share of the decode memory budget (:func:`crd_fast.io.limits.decode_budget`) sized from the
    file's header while the caller decodes and preprocesses it: parallel decoding is bounded by memory."""
    size = image_size(path)
    need = 0 if size is None or size_problem(*size) is not None else size[0] * size[1] * BYTES_PER_PIXEL
    with decode_budget().reserve(need):
        yield


def list_image_files(folder: Union[str, os.PathLike], recursive: bool = False) -> list[str]:
    """Image files in ``folder`` (by extension, case-insensitive), sorted; FileNotFoundError if it is not a folder.
    crd_fast's own temporary files and staging folders (``.crd-*``, e.g. left by a killed run) are never listed."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    pattern = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        str(p)
        for p in pattern
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(TEMP_PREFIX) for part in p.relative_to(root).parts)  # crd_fast's staging
        and p.is_file()
    )


def image_item(obj: Any, where: str) -> ImageItem:
    """Resolve one element of a list or data set to (path or None, image); TypeError naming ``where`` otherwise."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj), os.fspath(obj)
    if isinstance(obj, (Image.Image, np.ndarray)):
        return None, obj
    if is_tensor_like(obj):
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
            return image_item(obj["image"], where)
    if isinstance(obj, (tuple, list)) and obj:
        return image_item(obj[0], where)
    raise TypeError(
        f"{where}: cannot use an item of type {type(obj).__name__} as an image "
        "(expected a path, PIL image, numpy array, tensor or an object with image_path)"
    )


def iter_images(images: Any, error: type[Exception] = ValueError) -> Iterator[ImageItem]:
    """Yield (path or None, image) for every image in ``images`` (see the module docstring).

    An empty folder or a tensor of the wrong shape raises ``error`` (a ValueError subclass by convention);
    a missing path FileNotFoundError; an unusable item TypeError.
    """
    if is_tensor_like(images):
        batch = images[None] if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise error(f"an image tensor must be (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
        for i in range(batch.shape[0]):
            yield None, batch[i]
        return
    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        if p.is_dir():
            files = list_image_files(p)
            if not files:
                raise error(f"image folder {str(p)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
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
            yield image_item(images[i], f"{name}[{i}]")
        return
    try:
        iterator = iter(images)
    except TypeError:
        raise TypeError(
            f"images must be a folder, a file, a list of images or paths, a tensor batch or a data set; "
            f"got {type(images).__name__}"
        ) from None
    for i, obj in enumerate(iterator):
        yield image_item(obj, f"images[{i}]")
