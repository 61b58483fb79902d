"""Image loading and PatchCore's preprocessing: resize, center crop, ImageNet normalisation.

Every image kind goes through the same float32 path, so a PIL image, a numpy array and a [0, 1] tensor
of the same picture give the same model input:

    RGB in [0, 1] -> resize the shorter side to ``resize`` (bilinear, antialias)
                  -> center crop ``crop`` x ``crop`` -> (x - mean) / std
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

# Decoding and the ImageNet constants are torch-free and shared with the ONNX runtime; re-exported here,
# where the pipeline imports them.
from ..choices import MAX_IMAGE_SIDE as CHOICES_MAX_IMAGE_SIDE
from ..io.images import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageReadError, load_image, to_rgb  # noqa: F401

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]
#: Largest accepted ``resize`` / ``crop``: the backbone runs on crop x crop inputs (4096^2 already needs GBs).
MAX_IMAGE_SIDE = CHOICES_MAX_IMAGE_SIDE


def _from_uint8(t: torch.Tensor) -> torch.Tensor:
    # One conversion for every 8-bit source, so PIL, numpy and tensor inputs give bit-identical floats.
    return t.float() / 255.0


def to_unit_tensor(image: ImageLike) -> torch.Tensor:
    """Any supported image as a (3, H, W) float32 RGB tensor in [0, 1].

    PIL images (any mode); numpy (H, W) or (H, W, C) arrays, uint8/uint16 (full range) or float in [0, 1];
    tensors (3, H, W) or (1, H, W) or (H, W), float in [0, 1] or uint8.
    """
    if isinstance(image, Image.Image):
        return _from_uint8(TF.pil_to_tensor(to_rgb(image)))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"a numpy image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}"
            )
        arr = arr[:, :, :3]
        if arr.dtype == np.uint8:
            t = _from_uint8(torch.from_numpy(np.ascontiguousarray(arr)))
        elif arr.dtype == np.uint16:
            t = torch.from_numpy(arr.astype(np.float32)) / 65535.0
        elif arr.dtype.kind == "f":
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        else:
            raise TypeError(f"a numpy image must be uint8, uint16 or float, got {arr.dtype}")
        t = t.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"a tensor image must be (3, H, W), (1, H, W) or (H, W), got shape {tuple(image.shape)}")
        t = _from_uint8(t) if t.dtype == torch.uint8 else t.float()
    else:
        raise TypeError(f"unsupported image type {type(image).__name__} (expected a PIL image, numpy array or tensor)")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    check_unit_range(t, "image")
    return t.contiguous()


def check_unit_range(t: torch.Tensor, name: str) -> None:
    """Refuse float images outside [0, 1] (e.g. already normalised, or 0..255 floats) and non-finite values."""
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    lo, hi = float(t.min()), float(t.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{name} values must be in [0, 1] (got range [{lo:.4g}, {hi:.4g}]); pass raw RGB, not normalised input"
        )


class Preprocess:
    """PatchCore's preprocessing with settable sizes: ``resize`` (shorter side) then center ``crop``.

    ``preprocess(image)`` -> normalised (3, crop, crop) float32; ``preprocess.batch(x)`` does the same for a
    (B, 3, H, W) [0, 1] tensor at once; ``preprocess.display(image)`` gives the cropped RGB picture
    (crop, crop, 3) uint8 the anomaly map is aligned with; ``preprocess.mask(mask)`` transforms a mask the same way.
    """

    def __init__(
        self,
        resize: int = 256,
        crop: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        for name, v in (("resize", resize), ("crop", crop)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_IMAGE_SIDE:
                raise ValueError(f"{name} must be an integer in [1, {MAX_IMAGE_SIDE}], got {v!r}")
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        self.resize, self.crop = int(resize), int(crop)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        """Resize + center crop of a (..., 3, H, W) float tensor (no normalisation)."""
        x = TF.resize(x, [self.resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(x, [self.crop, self.crop])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return TF.normalize(x, list(self.mean), list(self.std))

    def __call__(self, image: Any) -> torch.Tensor:
        """One image (PIL / numpy / tensor, see ``to_unit_tensor``) -> normalised (3, crop, crop) float32."""
        return self.normalize(self.geometric(to_unit_tensor(image)))

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, 3, H, W) float tensor in [0, 1] (any device) -> normalised (B, 3, crop, crop) float32."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"an image batch must be a (B, 3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}"
            )
        x = _from_uint8(x) if x.dtype == torch.uint8 else x.float()
        check_unit_range(x, "image batch")
        return self.normalize(self.geometric(x))

    def display(self, image: Any) -> np.ndarray:
        """The resized, cropped RGB picture as (crop, crop, 3) uint8, aligned pixel for pixel with the anomaly map."""
        t = self.geometric(to_unit_tensor(image)).clamp(0, 1)
        return (t.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)

    def mask(self, mask: Union[Image.Image, np.ndarray]) -> np.ndarray:
        """A ground-truth mask (PIL or (H, W) array, nonzero = defect) -> (crop, crop) bool, nearest resize."""
        arr = np.asarray(
            mask.convert("L") if isinstance(mask, Image.Image) and mask.mode not in ("L", "1", "I;16", "I") else mask
        )
        if arr.ndim == 3:
            arr = arr.max(axis=2)
        if arr.ndim != 2:
            raise ValueError(f"a mask must be 2-D (H, W), got shape {arr.shape}")
        t = torch.from_numpy((arr > 0).astype(np.uint8))[None]
        t = TF.resize(t, [self.resize], interpolation=TF.InterpolationMode.NEAREST, antialias=False)
        return TF.center_crop(t, [self.crop, self.crop])[0].numpy().astype(bool)

    def __repr__(self) -> str:
        return f"Preprocess(resize={self.resize}, crop={self.crop})"
