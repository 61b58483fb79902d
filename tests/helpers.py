"""Helpers shared by several test modules: the CUDA skip marker and a random patch bank.

Imported as a plain module (``from helpers import cuda, random_bank``): pytest puts this folder on
``sys.path`` (rootdir-relative "prepend" import mode), as it does for ``deploy_fixtures``. Fixtures live
in conftest.py, which tests never import.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

#: Marks a test that needs a CUDA device; skipped (with the reason) on machines without one.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_bank(rng: np.random.Generator, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    """n correlated Gaussian patches of dimension d (float64), with a decaying spectrum like CNN features."""
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))
    mixing = rng.standard_normal((d, d)) * scales[None, :]
    return rng.standard_normal((n, d)) @ mixing.T + offset
