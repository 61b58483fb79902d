"""The patch embedding: backbone feature maps -> one d-dimensional vector per grid position.

Specified in docs/DESIGN.md ("Pipeline"):

    per layer: 3x3 average pooling, stride 1, padding 1 (zero padding counted, as PatchCore)
    every layer bilinearly resized to the first layer's grid (align_corners=False)
    concatenated along channels ("concat"), or reduced to ``target_dim`` channels by PatchCore's
    two adaptive average poolings ("patchcore")

Every step is linear, which the fused kernels exploit (crd_fast/ops/plan.py). Readable first: the
fused path never builds these embeddings.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..choices import EMBEDDINGS


def pool_feature_map(fmap: torch.Tensor) -> torch.Tensor:
    """3x3 average pooling, stride 1, zero padding 1 counted in the average (PatchCore's local aggregation)."""
    return F.avg_pool2d(fmap, kernel_size=3, stride=1, padding=1, count_include_pad=True)


def resize_to(fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (align_corners=False); a no-op when already that size."""
    if tuple(fmap.shape[-2:]) == tuple(size):
        return fmap
    return F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)


def patchcore_reduce(features: torch.Tensor, layer_channels: Sequence[int], target_dim: int = 1024) -> torch.Tensor:
    """PatchCore's channel reduction of a (N, sum(layer_channels)) patch matrix to (N, target_dim).

    Each layer's channels are adaptively average-pooled to ``target_dim``, the layers are laid side by
    side, and that vector is adaptively average-pooled to ``target_dim`` again. Both steps are linear.
    """
    per_layer = torch.split(features, list(layer_channels), dim=1)
    pooled = [F.adaptive_avg_pool1d(part.unsqueeze(1), target_dim).squeeze(1) for part in per_layer]
    stacked = torch.cat(pooled, dim=1)
    return F.adaptive_avg_pool1d(stacked.unsqueeze(1), target_dim).squeeze(1)


def embedding_dim(layer_channels: Sequence[int], embedding: str = "concat", target_dim: int = 1024) -> int:
    """The patch dimension d an embedding produces from layers of the given channel counts."""
    check_embedding(embedding)
    return int(sum(layer_channels)) if embedding == "concat" else int(target_dim)


def check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")


def embed_patches(
    feature_maps: Sequence[torch.Tensor], embedding: str = "concat", target_dim: int = 1024
) -> torch.Tensor:
    """Patch embeddings (B, d, H, W) on the first layer's (H, W) grid from (B, C_l, H_l, W_l) maps."""
    check_embedding(embedding)
    if len(feature_maps) == 0:
        raise ValueError("at least one feature map is needed")
    batch = feature_maps[0].shape[0]
    for i, f in enumerate(feature_maps):
        if f.ndim != 4 or f.shape[0] != batch:
            raise ValueError(f"feature map {i} must be (B={batch}, C, H, W), got shape {tuple(f.shape)}")
    size = tuple(feature_maps[0].shape[-2:])
    layers = [resize_to(pool_feature_map(f), size) for f in feature_maps]
    concat = torch.cat(layers, dim=1)
    if embedding == "concat":
        return concat
    b, c, h, w = concat.shape
    flat = concat.permute(0, 2, 3, 1).reshape(-1, c)
    reduced = patchcore_reduce(flat, [f.shape[1] for f in feature_maps], target_dim)
    return reduced.reshape(b, h, w, target_dim).permute(0, 3, 1, 2)


def patch_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, d, H, W) embeddings as a (B*H*W, d) matrix of patches, row-major over (b, y, x)."""
    b, d, h, w = embeddings.shape
    return embeddings.permute(0, 2, 3, 1).reshape(b * h * w, d)


def patch_grids(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, d, H, W) embeddings as (B, H*W, d) patch grids: one row of positions per image, row-major over (y, x)."""
    b, d, h, w = embeddings.shape
    return embeddings.reshape(b, d, h * w).transpose(1, 2)
