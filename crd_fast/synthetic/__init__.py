"""Synthetic industrial-inspection images with exact defect masks, in the MVTec AD layout.

Used by ``crd-fast demo`` and by tests: a periodic texture (``fabric``), a stochastic texture (``stone``)
and an object with a fixed layout (``cap``); defects: scratch, crack, hole, stain, missing (piece).
Pure numpy / scipy / PIL, deterministic by seed.
"""

from .dataset import (
    CATEGORIES,
    DEFAULT_CATEGORIES,
    MARKER,
    CategorySpec,
    SyntheticDataset,
    generate_dataset,
    render_sample,
)
from .defects import PAINTERS

__all__ = [
    "CATEGORIES",
    "DEFAULT_CATEGORIES",
    "MARKER",
    "PAINTERS",
    "CategorySpec",
    "SyntheticDataset",
    "generate_dataset",
    "render_sample",
]
