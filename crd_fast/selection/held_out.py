"""The held-out images of the label-free choice: their clean patch grids and one pseudo-defect painted on each.

The pseudo-defects (crd_fast/synthetic/pseudo.py) are painted on the de-normalised picture (the backbone's own
mean and std, so HED's BGR 0-255 convention as well), normalised again and embedded by the detector.
docs/DESIGN.md "Label-free lam" says why they are painted at ``PSEUDO_STRENGTH``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..core.lam_selection import grid_masks
from ..synthetic.pseudo import make_pseudo_defects

#: The pseudo-defects' painted change is multiplied by this (``make_pseudo_defects``'s strength): at 1 a random
#: backbone on the development set told none of them from clean images at any lam (docs/DESIGN.md "Label-free lam").
PSEUDO_STRENGTH = 4.0


def pseudo_defect_batch(
    clean: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int, strength: float = PSEUDO_STRENGTH
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """One pseudo-defect (at ``strength``) per normalised input of ``clean`` (H, 3, S, S), made on the
    de-normalised picture.

    Returns the pseudo-defect inputs normalised again with ``mean``/``std`` (H, 3, S, S) float32, their pixel
    masks (H, S, S) bool and the kinds painted. The other held-out pictures are the cut-and-paste donors.
    """
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    pictures = (clean.float().cpu() * s + m).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().numpy()
    rng = np.random.default_rng(seed)
    images, masks, kinds = make_pseudo_defects(rng, list(pictures), list(pictures), strength=strength)
    painted = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return ((painted - m) / s).contiguous(), np.stack(masks), kinds


@dataclass
class HeldOutSet:
    """The held-out images' patch grids, clean and with pseudo-defects, and the pseudo-defect grid masks."""

    clean: torch.Tensor  # (H, P, d) float32
    pseudo: torch.Tensor  # (H, P, d) float32
    masks: np.ndarray  # (H, h, w) bool, on the patch grid
    kinds: list[str]

    @property
    def labels(self) -> np.ndarray:
        """0 for each clean image, then 1 for each pseudo-defect image."""
        n = self.clean.shape[0]
        return np.concatenate([np.zeros(n, dtype=int), np.ones(self.pseudo.shape[0], dtype=int)])

    @property
    def all_masks(self) -> np.ndarray:
        """The grid masks of the clean images (all False), then the pseudo-defects'."""
        return np.concatenate([np.zeros_like(self.masks), self.masks])

    @classmethod
    def build(
        cls,
        clean: torch.Tensor,
        pseudo: torch.Tensor,
        pixel_masks: np.ndarray,
        kinds: list[str],
        grid_shape: tuple[int, int],
    ) -> "HeldOutSet":
        """From the grids and the pseudo-defects' pixel masks (reduced to the (h, w) patch grid)."""
        return cls(clean, pseudo, grid_masks(pixel_masks, grid_shape), kinds)


__all__ = ["PSEUDO_STRENGTH", "HeldOutSet", "pseudo_defect_batch"]
