"""The label-free choice of the detector's scoring model and lam_rel (lam_rel="auto", spatial="auto").

* ``plan`` (torch-free): which training images are held out, and when no choice can be made;
* ``held_out``: the held-out images' grids and their pseudo-defects;
* ``choice``: the decision on the held-out images (likelihood for the model, pseudo-defects for lam_rel);
* ``record`` (torch-free): :class:`SelectionRecord`, what was chosen and why, in words where it is shown;
* ``selector``: :class:`LabelFreeSelector`, fed batch by batch during the detector's fit.

Importing this package imports no torch (the command line reads records); the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .plan import MIN_IMAGES, HeldOutPlan
from .record import SelectionRecord, selection_table

_LAZY = {"LabelFreeSelector": "selector", "HeldOutSet": "held_out", "choose": "choice", "Choice": "choice"}

__all__ = ["MIN_IMAGES", "HeldOutPlan", "SelectionRecord", "selection_table", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
