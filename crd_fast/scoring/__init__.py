"""Scoring models: the one interface the detector, the label-free choice, deploy and distributed fitting speak to.

* ``base``: :class:`ScoringModel` (the interface), :class:`FeatureLayout`, :class:`ScoreHead`;
* ``registry`` (torch-free): model names -> classes, :func:`register` for new models;
* ``global_crd``: :class:`GlobalCRD`, the paper's CRD (one covariance for every patch position);
* ``local_crd``: :class:`LocalCRD`, the position-aware CRD (aligned parts);
* ``candidates``: how each model takes part in the label-free choice.

Importing this package imports no torch (the command line reads the registry); the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import model_class, model_names, register, selectable_names, spatial_modes

_LAZY = {
    "ScoringModel": "base",
    "FeatureLayout": "base",
    "ScoreHead": "base",
    "UnsupportedOption": "base",
    "GlobalCRD": "global_crd",
    "LocalCRD": "local_crd",
}

__all__ = ["model_class", "model_names", "register", "selectable_names", "spatial_modes", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
