"""AnomalyMapper: patch score map -> anomaly map at the model input resolution.

Bilinear upsampling (align_corners=False) to (H, W), then a Gaussian blur with sigma 4 (PatchCore's
smoothing): a separable pair of 1-D convolutions with reflect padding and a kernel of
2 * int(4 * sigma + 0.5) + 1 taps (the same kernel as scipy.ndimage.gaussian_filter with truncate=4 and
mode="mirror"). Pure torch, so it exports to ONNX with the rest of the model.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of 2 * int(4 * sigma + 0.5) + 1 taps, float64."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class AnomalyMapper(nn.Module):
    """(B, h, w) patch map -> (B, H, W) anomaly map: bilinear upsample to ``size`` then Gaussian blur.

    Args:
        size: output (H, W), or one int for a square; the model input (crop) size.
        sigma: blur standard deviation in output pixels; 0 disables the blur.
    """

    def __init__(self, size: Union[int, Sequence[int]], sigma: float = 4.0) -> None:
        super().__init__()
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.size = hw
        self.sigma = float(sigma)
        self.radius = int(4.0 * self.sigma + 0.5) if self.sigma > 0 else 0  # gaussian_kernel1d's radius
        if self.radius >= min(hw):  # checked before the kernel is built: a huge sigma must not allocate it
            raise ValueError(
                f"blur sigma={sigma} needs a radius of {self.radius} pixels, more than the map size {hw} allows"
            )
        kernel = gaussian_kernel1d(self.sigma) if self.sigma > 0 else torch.ones(1, dtype=torch.float64)
        self.register_buffer("kernel", kernel.float())

    def forward(self, patch_map: torch.Tensor) -> torch.Tensor:
        if patch_map.ndim != 3:
            raise ValueError(f"patch_map must be (B, h, w), got shape {tuple(patch_map.shape)}")
        x = F.interpolate(patch_map.unsqueeze(1), size=self.size, mode="bilinear", align_corners=False)
        if self.radius > 0:
            r = self.radius
            k = self.kernel.to(x.dtype)
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        return x.squeeze(1)

    def extra_repr(self) -> str:
        return f"size={self.size}, sigma={self.sigma}"
