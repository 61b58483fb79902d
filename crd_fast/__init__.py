"""crd-fast: industrial visual anomaly detection with the Collaborative Representation Distance.

from crd_fast import CRDScorer, NNScorer
scorer = CRDScorer().fit(train_patches)      # (N, d) tensor or array of normal patch features
scores = scorer.score(test_patches)          # one score per row, same kind and device
"""

import logging as _logging

from ._version import __version__

# The library logs through module-level loggers under "crd_fast" and never prints; an application (or
# the crd-fast command line) decides where the records go.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# Everything below needs torch, so it is imported on first use: `import crd_fast.deploy` (the ONNX
# runtime) must work on a machine without torch.
_LAZY = {
    "backends": ".ops",
    "ModelFileError": ".io.model_file",
    "NNScorer": ".scorers",
    "CRDScorer": ".scorers",
    "LocalCRDScorer": ".scorers",
    "DEFAULT_LAM_REL": ".scorers",
    "CRDDetector": ".detector",
    "DetectionResult": ".postprocess",
}

__all__ = [
    "CRDScorer",
    "LocalCRDScorer",
    "NNScorer",
    "ModelFileError",
    "DEFAULT_LAM_REL",
    "backends",
    "__version__",
    "CRDDetector",
    "DetectionResult",
]


def __getattr__(name: str):
    # The detector pulls in torchvision and PIL, the rest torch: import on first use, not with the package.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'crd_fast' has no attribute {name!r}")
