"""Heatmap overlays of anomaly maps on images, and atomic PNG writing.

The image and the map must cover the same pixels: pass the image the model actually saw (resized and
center-cropped), at the map's resolution. Nothing here resizes silently, because a map of a crop
stretched over the full image would point at the wrong place.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from ..io.atomic import atomic_write
from ..io.tensors import numpy_if_tensor

PathLike = Union[str, os.PathLike]
#: Outline colour of predicted masks (ground truth is white): magenta stands out on the jet colormap.
PRED_COLOR = (255, 0, 255)

__all__ = [
    "to_rgb_uint8",
    "normalize_map",
    "colorize",
    "heatmap_overlay",
    "mask_contour",
    "draw_contour",
    "save_png",
    "png_bytes",
]


def to_rgb_uint8(image: Any, name: str = "image") -> np.ndarray:
    """A PIL image or (H, W) / (H, W, 1|3|4) array as (H, W, 3) uint8 (floats are read as [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(numpy_if_tensor(image))
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name} must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or Inf")
        return np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    if arr.dtype.kind in "ui":
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{name} of dtype {arr.dtype} has values outside 0..255; convert it to uint8 first")
        return arr.astype(np.uint8)
    raise TypeError(f"{name} has unsupported dtype {arr.dtype}")


def normalize_map(anomaly_map: Any, vmin: Optional[float] = None, vmax: Optional[float] = None) -> np.ndarray:
    """Scale a (H, W) map to [0, 1] between ``vmin`` and ``vmax`` (default: the map's own min and max).

    Pass the same vmin/vmax for every image of a set so colours are comparable between images.
    """
    amap = np.asarray(numpy_if_tensor(anomaly_map), dtype=np.float64)
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must be a 2-D (H, W) array, got shape {amap.shape}")
    if not np.isfinite(amap).all():
        raise ValueError("anomaly_map contains NaN or Inf")
    lo = float(amap.min()) if vmin is None else float(vmin)
    hi = float(amap.max()) if vmax is None else float(vmax)
    if hi < lo:
        raise ValueError(f"vmax ({hi}) is below vmin ({lo})")
    if hi == lo:  # a flat map: nothing stands out
        return np.zeros_like(amap)
    return np.clip((amap - lo) / (hi - lo), 0.0, 1.0)


def colorize(values01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H, W) values in [0, 1] through a matplotlib colormap, as (H, W, 3) uint8."""
    from matplotlib import colormaps

    if cmap not in colormaps:
        raise ValueError(f"unknown matplotlib colormap {cmap!r} (try 'jet' or 'inferno')")
    rgba = colormaps[cmap](values01, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def heatmap_overlay(
    image: Any,
    anomaly_map: Any,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    mask: Optional[Any] = None,
    contour_color: Sequence[int] = (255, 255, 255),
    contour_width: int = 1,
    pred_mask: Optional[Any] = None,
    pred_color: Sequence[int] = PRED_COLOR,
) -> np.ndarray:
    """Blend a colour-mapped anomaly map over ``image``; optionally outline a ground-truth ``mask`` (white)
    and a predicted mask ``pred_mask`` (magenta, drawn over the ground truth where they meet).

    ``image``: (H, W, 3) uint8 array, float array in [0, 1], or PIL image; ``anomaly_map``: (H, W), scaled
    to [0, 1] by :func:`normalize_map` with ``vmin``/``vmax``; ``alpha``: weight of the heatmap
    (0 = image only, 1 = heatmap only). Returns an (H, W, 3) uint8 array.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = to_rgb_uint8(image)
    values = normalize_map(anomaly_map, vmin, vmax)
    if values.shape != rgb.shape[:2]:
        raise ValueError(
            f"anomaly_map shape {values.shape} does not match the image size {rgb.shape[:2]}; "
            "pass the image the model saw (resized and cropped to the map's size)"
        )
    heat = colorize(values, cmap).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    out = np.round(out).astype(np.uint8)
    for name, m, color in (("mask", mask, contour_color), ("pred_mask", pred_mask, pred_color)):
        if m is not None:
            draw_contour(out, m, color, contour_width, name)
    return out


def mask_contour(mask: Any, width: int = 1) -> np.ndarray:
    """The inner outline (``width`` pixels) of a (H, W) mask (nonzero = inside), as a bool array."""
    if width < 1:
        raise ValueError(f"contour_width must be at least 1, got {width}")
    m = np.asarray(mask) != 0
    edge = m & ~ndimage.binary_erosion(m, border_value=0)
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1)
    return edge


def draw_contour(rgb: np.ndarray, mask: Any, color: Sequence[int], width: int = 1, name: str = "mask") -> None:
    """Paint the outline of ``mask`` into the (H, W, 3) uint8 image ``rgb`` in place."""
    m = np.asarray(numpy_if_tensor(mask))
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"{name} shape {m.shape} does not match the image size {rgb.shape[:2]}")
    rgb_color = np.asarray(color, dtype=np.uint8)
    if rgb_color.shape != (3,):
        raise ValueError(f"contour colour must be an (R, G, B) triple, got {color!r}")
    rgb[mask_contour(m, width)] = rgb_color


def png_bytes(array: Any) -> bytes:
    """Encode an (H, W) or (H, W, 3) image array as PNG bytes (for embedding in HTML)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(_as_png_array(array)).save(buf, format="PNG")
    return buf.getvalue()


def _as_png_array(array: Any) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim == 2 and arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.ndim == 2 and arr.dtype == np.uint8:
        return arr
    return to_rgb_uint8(arr, "array")


def save_png(path: PathLike, array: Any) -> None:
    """Write an (H, W) uint8/bool or (H, W, 3) image array as a PNG file, atomically."""
    arr = _as_png_array(array)
    with atomic_write(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
