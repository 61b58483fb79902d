"""The pure-PyTorch reference head: the specification every fast path is tested against.

From backbone feature maps to a CRD patch score map: the embedding of crd_fast/core/embedding.py, then
score of each patch = ||P (y - mu)||_2. Readable first, fast never: ``crd_fast.ops.crd_head`` is the fast path.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.embedding import embed_patches, patch_matrix


def crd_scores(
    patches: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """||matrix (y - offset)||_2 for each row y of ``patches``, computed in ``dtype`` (float64: the specification)."""
    z = patches.to(dtype) - offset.to(patches.device, dtype)
    return torch.linalg.vector_norm(z @ matrix.to(patches.device, dtype).T, dim=1)


def crd_score_map(
    embeddings: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """(B, H, W) CRD score map of (B, d, H, W) embeddings, computed in ``dtype``."""
    b, _, h, w = embeddings.shape
    return crd_scores(patch_matrix(embeddings), matrix, offset, dtype).reshape(b, h, w)


def crd_head(
    feature_maps: Sequence[torch.Tensor],
    matrix: torch.Tensor,
    offset: torch.Tensor,
    embedding: str = "concat",
    target_dim: int = 1024,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The whole head, feature maps to a (B, H, W) patch score map: the fused kernels' specification.

    In float64 (the default) the feature maps are promoted first, so every step runs in float64;
    ``dtype=torch.float32`` gives the unfused float32 path that benchmarks compare against.
    """
    maps = [f.to(dtype) for f in feature_maps]
    return crd_score_map(embed_patches(maps, embedding, target_dim), matrix, offset, dtype)


def crd_residual(
    feature_maps: Sequence[torch.Tensor],
    matrix: torch.Tensor,
    q: torch.Tensor,
    embedding: str = "concat",
    target_dim: int = 1024,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """(B, H, W, r) residual vectors matrix y_(y, x) - q_(y, x) of the patch embeddings, no norm.

    ``q`` is (H W, r), one offset per grid position in row-major (y, x) order: the per-position part of the local
    head (docs/DESIGN.md "Position-aware CRD"). The fused residual paths' specification, computed in ``dtype``.
    """
    maps = [f.to(dtype) for f in feature_maps]
    emb = embed_patches(maps, embedding, target_dim)
    b, _, h, w = emb.shape
    rows = patch_matrix(emb) @ matrix.to(emb.device, dtype).T  # (B H W, r), row-major over (b, y, x)
    return (rows.reshape(b, h * w, -1) - q.to(emb.device, dtype)).reshape(b, h, w, -1)
