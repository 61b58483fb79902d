"""crd-fast: industrial visual anomaly detection with the Collaborative Representation Distance.

    from crd_fast import CRDScorer, NNScorer
    scorer = CRDScorer().fit(train_patches)      # (N, d) tensor or array of normal patch features
    scores = scorer.score(test_patches)          # one score per row, same kind and device
"""

from ._native import backends
from ._version import __version__
from .io.model_file import ModelFileError
from .nn import NNScorer
from .scorer import DEFAULT_LAM_REL, CRDScorer

__all__ = ["CRDScorer", "NNScorer", "ModelFileError", "DEFAULT_LAM_REL", "backends", "__version__"]
