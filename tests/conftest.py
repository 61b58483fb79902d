"""Shared fixtures: one torch thread, and a seeded generator per test.

Tests never import this file; plain helpers (the CUDA marker, random patch banks) are in helpers.py."""

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
