"""Helpers shared by several test modules: the CUDA skip marker, a random patch bank, CLI and torchrun arguments.

Imported as a plain module (``from helpers import cuda, random_bank``): pytest puts this folder on
``sys.path`` (rootdir-relative "prepend" import mode), as it does for ``deploy_fixtures``. Fixtures live
in conftest.py, which tests never import.
"""

from __future__ import annotations

import socket
import sys

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


def cli_detector_args(px: int, batch_size: int) -> list[str]:
    """The small, fast detector the CLI tests fit: random resnet18 at ``px`` pixels, no progress bars."""
    return ["--backbone", "resnet18", "--weights", "random", "--resize", str(px), "--crop", str(px),
            "--batch-size", str(batch_size), "--no-progress"]  # fmt: skip


def torchrun_command(nproc: int, *extra: str) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local ranks on a free loopback port, then ``extra``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), *extra]  # fmt: skip
