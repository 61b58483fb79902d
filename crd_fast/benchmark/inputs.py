"""The benchmarks' random inputs: backbone-like feature maps and patch rows.

The features are random (no weights or data sets can be downloaded here), with a realistic shape:
wide_resnet50_2's layer2 (512 x 28 x 28) and layer3 (1024 x 14 x 14) at 224 px, low rank plus noise,
non-negative like ReLU outputs. Speed does not depend on their values.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..core.embedding import embed_patches, patch_matrix
from .config import WRN50_LAYERS


class FeatureGenerator:
    """Random backbone-like feature maps: ReLU(low-rank signal + noise), deterministic per (seed, index).

    Args:
        layers: (channels, height, width) of each layer's map.
        rank: dimension of the signal subspace of each layer.
        noise: standard deviation of the isotropic noise (the signal has unit scale per latent).
        seed: seed of the per-layer bases; the maps of item ``index`` are seeded by (seed, index).
    """

    def __init__(
        self, layers: Sequence[tuple[int, int, int]] = WRN50_LAYERS, rank: int = 32, noise: float = 0.5, seed: int = 0
    ) -> None:
        if not layers or any(len(layer) != 3 or min(layer) < 1 for layer in layers):
            raise ValueError(f"layers must be a non-empty list of positive (C, H, W), got {layers!r}")
        if rank < 1 or noise < 0:
            raise ValueError(f"rank must be >= 1 and noise >= 0, got rank={rank}, noise={noise}")
        self.layers = tuple(tuple(int(v) for v in layer) for layer in layers)
        self.rank, self.noise, self.seed = int(rank), float(noise), int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        # decaying column scales: a spectrum that falls off like a CNN's, not a flat one
        decay = 1.0 / torch.arange(1, self.rank + 1, dtype=torch.float32).sqrt()
        self._bases = [torch.randn(self.rank, c, generator=gen) * decay[:, None] for c, _, _ in self.layers]
        self._bias = [0.3 * torch.randn(c, generator=gen) for c, _, _ in self.layers]

    @property
    def channels(self) -> list[int]:
        return [c for c, _, _ in self.layers]

    @property
    def patches_per_image(self) -> int:
        return self.layers[0][1] * self.layers[0][2]

    def maps(self, n_images: int, index: int = 0) -> list[Tensor]:
        """(n_images, C_l, H_l, W_l) float32 maps, one per layer, contiguous NCHW."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * int(index) + 1)
        out = []
        for (c, h, w), basis, bias in zip(self.layers, self._bases, self._bias):
            codes = torch.randn(n_images * h * w, self.rank, generator=gen)
            x = torch.addmm(bias, codes, basis)
            x.add_(torch.randn(x.shape, generator=gen), alpha=self.noise).relu_()
            out.append(x.reshape(n_images, h, w, c).permute(0, 3, 1, 2).contiguous())
        return out

    def batches(self, n_images: int, batch: int) -> Iterator[list[Tensor]]:
        """Maps of ``n_images`` images, ``batch`` at a time (each batch seeded by its position)."""
        for i, start in enumerate(range(0, n_images, batch)):
            yield self.maps(min(batch, n_images - start), index=i)


def random_patches(n: int, dim: int, rank: int = 32, noise: float = 0.5, seed: int = 0) -> Tensor:
    """(n, dim) float32 ReLU(low-rank + noise) patch rows, like concatenated CNN features."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=torch.Generator().manual_seed(12345))
    basis /= torch.arange(1, rank + 1, dtype=torch.float32).sqrt()[:, None]
    x = torch.randn(n, rank, generator=gen) @ basis
    return x.add_(torch.randn(x.shape, generator=gen), alpha=noise).relu_()


def patch_rows(maps: Sequence[Tensor], embedding: str, target_dim: int = 1024) -> Tensor:
    """The (B*H*W, d) patch matrix of the maps' embedding (the reference's, row order (b, y, x))."""
    return patch_matrix(embed_patches(list(maps), embedding, target_dim)).contiguous()
