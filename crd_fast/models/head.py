"""CRDHead: backbone feature maps -> CRD patch score map, as an exportable torch module.

The score of a patch y is ||P (y - mu)|| = ||P y - q|| with q = P mu. Everything between the feature maps
and y (3x3 average pooling, bilinear resize, concatenation, PatchCore's channel reduction) is linear and
acts on channels and positions separately, so the torch path here applies P first, on each layer at its
own resolution (P = [P_1 | P_2 | ...] by column blocks, with PatchCore's reduction folded into P), and
pools/resizes the r-channel result (docs/DESIGN.md "Linearity"). Deep layers are projected on their coarse
grid, and the module is plain conv2d / pooling / interpolation / arithmetic, which ONNX exports.

With ``use_fused`` set, eager calls use the fused op ``crd_fast.ops.crd_head`` instead (it always exists and
falls back by itself where no kernel runs); tracing, scripting and export always take the pure-torch path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.embedding import check_embedding, patchcore_reduce, pool_feature_map, resize_to
from ..ops import crd_head as fused_crd_head
from ..scorers.crd import CRDScorer


def _exporting() -> bool:
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting())


def folded_matrix(
    matrix: torch.Tensor, layer_channels: Sequence[int], embedding: str = "concat", target_dim: int = 1024
) -> torch.Tensor:
    """P composed with the embedding's channel map: an (r, sum(layer_channels)) matrix acting on raw channels.

    "concat" needs nothing (P's columns already are the concatenated channels); for "patchcore" the
    linear reduction R (target_dim x sum C) is materialised by reducing the identity and P R is returned.
    Computed in float64.
    """
    check_embedding(embedding)
    total = int(sum(layer_channels))
    m64 = matrix.to(torch.float64)
    if embedding == "concat":
        if m64.shape[1] != total:
            raise ValueError(f"matrix has {m64.shape[1]} columns but the layers have {total} channels in all")
        return m64
    if m64.shape[1] != target_dim:
        raise ValueError(f"matrix has {m64.shape[1]} columns but the patchcore embedding has target_dim={target_dim}")
    eye = torch.eye(total, dtype=torch.float64, device=m64.device)
    reduction = patchcore_reduce(eye, list(layer_channels), target_dim).T  # (target_dim, total)
    return m64 @ reduction


def folded_blocks(folded: torch.Tensor, layer_channels: Optional[Sequence[int]]) -> list[torch.Tensor]:
    """``folded`` (r, sum C_l) split into each layer's (r, C_l) column block (one block without layer channels)."""
    if layer_channels is None:
        return [folded]
    return list(torch.split(folded, [int(c) for c in layer_channels], dim=1))


def project_feature_maps(
    feature_maps: Sequence[torch.Tensor], folded: torch.Tensor, layer_channels: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """sum_l resize(pool(P'_l F_l)): the (B, r, H_0, W_0) projected embeddings, pure torch (exportable).

    ``folded`` is P' (r, sum C_l), the embedding folded in (:func:`folded_matrix`), cast to the maps' dtype.
    Each layer is projected on its own grid first, then pooled and resized (docs/DESIGN.md "Linearity").
    ``layer_channels``, when known, must equal the maps' channel counts.
    """
    maps = list(feature_maps)
    if not maps:
        raise ValueError("at least one feature map is needed")
    channels = [int(m.shape[1]) for m in maps]
    if layer_channels is not None and channels != list(layer_channels):
        raise ValueError(f"feature maps have {channels} channels, the head was built for {list(layer_channels)}")
    if sum(channels) != folded.shape[1]:
        raise ValueError(f"feature maps have {sum(channels)} channels in all, the head expects {folded.shape[1]}")
    size = (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
    total: Optional[torch.Tensor] = None
    start = 0
    for fmap, c in zip(maps, channels):
        weight = folded[:, start : start + c].to(fmap.dtype)
        start += c
        # 1x1 convolution = the matmul P_l f at every position of this layer's own grid.
        z = F.conv2d(fmap, weight[:, :, None, None])
        z = resize_to(pool_feature_map(z), size)
        total = z if total is None else total + z
    assert total is not None
    return total


class CRDHead(nn.Module):
    """The CRD head: feature maps (one per layer) -> (B, h, w) patch scores on the first layer's grid.

    Args:
        matrix: P, (r, d) (M_pre when r = d, or the rank-r W).
        offset: mu, (d,).
        embedding: "concat" or "patchcore" (see ``crd_fast.ops.reference``).
        target_dim: d of the patchcore embedding.
        layer_channels: channels of each input layer; needed up front for "patchcore" (it fixes the
            folded matrix), optional for "concat" (then taken from the inputs).
        use_fused: call the fused op ``crd_fast.ops.crd_head`` in eager mode.

    Buffers (float32): ``matrix`` (r, d), ``offset`` (d,), ``q`` = matrix @ offset (r,) (folded in float64),
    and ``folded`` (r, sum C): P with the embedding folded in (used by the torch path).
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        offset: torch.Tensor,
        embedding: str = "concat",
        target_dim: int = 1024,
        layer_channels: Optional[Sequence[int]] = None,
        use_fused: bool = True,
    ) -> None:
        super().__init__()
        check_embedding(embedding)
        if matrix.ndim != 2 or offset.ndim != 1 or matrix.shape[1] != offset.shape[0]:
            raise ValueError(
                f"matrix must be (r, d) and offset (d,), got {tuple(matrix.shape)} and {tuple(offset.shape)}"
            )
        if embedding == "patchcore" and layer_channels is None:
            raise ValueError(
                "the patchcore embedding needs layer_channels to fold its channel reduction into the matrix"
            )
        self.embedding = embedding
        self.target_dim = int(target_dim)
        self.use_fused = bool(use_fused)
        self.layer_channels = None if layer_channels is None else [int(c) for c in layer_channels]
        m64, o64 = matrix.detach().to(torch.float64), offset.detach().to(device=matrix.device, dtype=torch.float64)
        self.register_buffer("matrix", m64.float().contiguous())
        self.register_buffer("offset", o64.float().contiguous())
        self.register_buffer("q", (m64 @ o64).float().contiguous())
        if self.layer_channels is not None:
            folded = folded_matrix(m64, self.layer_channels, embedding, self.target_dim)
        else:  # concat without known layers: split the columns by the inputs' channel counts at run time
            folded = m64
        self.register_buffer("folded", folded.float().contiguous())

    @classmethod
    def from_scorer(
        cls,
        scorer: CRDScorer,
        embedding: str = "concat",
        target_dim: int = 1024,
        layer_channels: Optional[Sequence[int]] = None,
        use_fused: bool = True,
    ) -> "CRDHead":
        """A head with the fitted scorer's projection (its current lam_rel, center and rank)."""
        proj = scorer.projection
        return cls(proj.matrix, proj.offset, embedding, target_dim, layer_channels, use_fused)

    @property
    def rank(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of (B, C_l, H_l, W_l) maps -> (B, H_0, W_0) float32 patch scores."""
        maps = list(feature_maps)
        if self.use_fused and not _exporting():
            return fused_crd_head(maps, self.matrix, self.offset, self.embedding, self.target_dim).float()
        return self.torch_forward(maps)

    def torch_forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The pure-torch (exportable) path: project each layer, pool, resize, add, subtract q, norm."""
        total = project_feature_maps(feature_maps, self.folded, self.layer_channels)
        diff = total - self.q.to(total.dtype)[None, :, None, None]
        return diff.square().sum(dim=1).sqrt()

    def half_weights(self) -> list[torch.Tensor]:
        """The weights an fp16 ONNX export stores in float16: the folded matrix's column block of each layer (the
        1 x 1 convolution weights of ``torch_forward``)."""
        return folded_blocks(self.folded, self.layer_channels)

    def extra_repr(self) -> str:
        return (
            f"embedding={self.embedding!r}, r={self.rank}, d={self.dim}, layer_channels={self.layer_channels}, "
            f"use_fused={self.use_fused}"
        )
