"""Estimators on patch features (arrays or tensors in, one score per row out).

* ``crd``: :class:`CRDScorer`, the Collaborative Representation Distance (the product);
* ``nn``: :class:`NNScorer`, exact 1-NN distance to a memory bank (PatchCore's rule, the baseline);
* ``local``: :class:`LocalCRDScorer`, the position-aware CRD on (images, positions, d) patch grids;
* ``padim``: :class:`PaDiMScorer`, PaDiM's per-position Gaussian (a baseline, on patch grids).
"""

from .crd import DEFAULT_LAM_REL, CRDScorer
from .local import LocalCRDScorer
from .nn import NNScorer
from .padim import PaDiMScorer

__all__ = ["CRDScorer", "DEFAULT_LAM_REL", "LocalCRDScorer", "NNScorer", "PaDiMScorer"]
