"""The full detector: images in, image scores and anomaly maps out, saved to and loaded from one file.

``config`` (the options) and ``reservoir`` import without torch; ``CRDDetector`` is imported on first use,
so the command line can read the options without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import OPTIONS, RUNTIME_OPTIONS, DetectorConfig
from .reservoir import Reservoir

__all__ = ["CRDDetector", "DetectorConfig", "OPTIONS", "RUNTIME_OPTIONS", "Reservoir"]


def __getattr__(name: str) -> Any:
    if name == "CRDDetector":
        return importlib.import_module(".detector", __name__).CRDDetector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
