"""Torch-free image input for the ONNX runtime: the same preprocessing as ``crd_fast.features.preprocess``.

numpy and PIL only. Every image becomes RGB float32 in [0, 1], its shorter side is resized to ``resize``
(bilinear with antialiasing: PIL's float ("F" mode) resampler, the algorithm torchvision's antialiased
resize was ported from; they agree to about 2e-5 on [0, 1] pixels), center-cropped to ``crop`` and
normalised with the ImageNet mean and std. Accepted inputs are those of ``crd_fast.data.images`` (both use
``crd_fast.io.images``): a folder, an image file, a list or data set of paths / PIL images / numpy arrays /
CHW tensors, or one PIL image or array.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence, Union

import numpy as np
from PIL import Image

# The torch-free decoding and input handling shared with the PyTorch pipeline (re-exported for callers here).
from ..io.images import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageItem, list_image_files, to_rgb  # noqa: F401
from ..io.images import iter_images as _iter_images
from ..io.images import load_image as _load_image
from ..io.tensors import is_tensor_like


class ImageInputError(ValueError):
    """An image could not be read or has an unusable shape, dtype or value range (the message says which)."""


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open and decode an image file as 8-bit RGB; ImageInputError naming the file if it cannot be read."""
    return _load_image(path, error=ImageInputError)


def to_unit_array(image: Any) -> np.ndarray:
    """One image as a (3, H, W) float32 RGB array in [0, 1].

    PIL images (any mode); numpy (H, W) / (H, W, 1|3|4) arrays, uint8 or uint16 (full range) or float in
    [0, 1]; CHW tensors (converted through numpy, so torch is only touched if the caller passed one).
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(to_rgb(image), dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0))
    if is_tensor_like(image):
        t = image.detach().cpu()
        arr = np.asarray(t.float().numpy() if str(t.dtype) not in ("torch.uint8",) else t.numpy())
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] not in (1, 3):
            raise ImageInputError(
                f"a tensor image must be (3, H, W), (1, H, W) or (H, W), got shape {tuple(arr.shape)}"
            )
        arr = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
    elif isinstance(image, np.ndarray):
        arr = image[:, :, None] if image.ndim == 2 else image
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ImageInputError(
                f"a numpy image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}"
            )
        arr = arr[:, :, :3]
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / np.float32(255.0)
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / np.float32(65535.0)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        else:
            raise ImageInputError(f"a numpy image must be uint8, uint16 or float, got {arr.dtype}")
        arr = arr.transpose(2, 0, 1)
    else:
        raise ImageInputError(
            f"unsupported image type {type(image).__name__} (expected a path, PIL image, numpy array or tensor)"
        )
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    if arr.size == 0:
        raise ImageInputError(f"image is empty (shape {arr.shape})")
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise ImageInputError(
            f"image values must be in [0, 1] (got range [{lo:.4g}, {hi:.4g}]); pass raw RGB, not normalised input"
        )
    return np.ascontiguousarray(arr)


class NumpyPreprocess:
    """resize (shorter side, bilinear antialias) -> center crop -> ImageNet normalisation, numpy/PIL only."""

    def __init__(
        self,
        resize: int = 256,
        crop: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if not (isinstance(resize, int) and isinstance(crop, int) and 1 <= crop <= resize):
            raise ValueError(f"need integers 1 <= crop <= resize, got resize={resize!r}, crop={crop!r}")
        self.resize, self.crop = resize, crop
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after resizing the shorter side to ``resize`` (the long side truncated, as torchvision does)."""
        if width <= height:
            return int(self.resize * height / width), self.resize
        return self.resize, int(self.resize * width / height)

    def geometric(self, arr: np.ndarray) -> np.ndarray:
        """(3, H, W) float32 -> resized and center-cropped (3, crop, crop)."""
        h, w = arr.shape[1:]
        nh, nw = self.output_size(h, w)
        if (nh, nw) != (h, w):
            arr = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((nw, nh), Image.BILINEAR)) for c in arr])
        if min(nh, nw) < self.crop:
            raise ImageInputError(f"image of {nh}x{nw} after resizing is smaller than the crop {self.crop}")
        top = int(round((nh - self.crop) / 2.0))  # Python's round, as torchvision's center_crop
        left = int(round((nw - self.crop) / 2.0))
        return arr[:, top : top + self.crop, left : left + self.crop]

    def __call__(self, image: Any) -> np.ndarray:
        """Any supported image -> normalised (3, crop, crop) float32."""
        return np.ascontiguousarray((self.geometric(to_unit_array(image)) - self.mean) / self.std, dtype=np.float32)


def iter_images(images: Any) -> Iterator[ImageItem]:
    """(path or None, image) for a folder, a file, one PIL image / array, a (B, 3, H, W) tensor, a list or a
    data set of these (see :func:`crd_fast.io.images.iter_images`); bad folders and tensor shapes raise
    ImageInputError."""
    return _iter_images(images, error=ImageInputError)
