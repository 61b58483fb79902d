"""Shared fixtures: seeded generators and small random patch banks."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

# One intra-op thread: MKL's threaded eigh stalls badly when the two cores are also busy with other work.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (restored after it), for modules that run CLI jobs, torchrun
    workers or the demo: the two cores are shared, and MKL's threaded eigh stalls badly when oversubscribed.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's id so every test sees its own data and failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def random_bank(rng: np.random.Generator, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    """n correlated Gaussian patches of dimension d (float64), with a decaying spectrum like CNN features."""
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))
    mixing = rng.standard_normal((d, d)) * scales[None, :]
    return rng.standard_normal((n, d)) @ mixing.T + offset


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
