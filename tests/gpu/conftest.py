"""Fixtures of the GPU tests: the device, its capability, the base seed, and a check that a backend can run an op."""

from __future__ import annotations

import pytest
import torch

from crd_fast.ops import registry

from .kernel_checks import path_problem, seed


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "large: big inputs, left out by bench/gpu_check.py --quick")
    config.addinivalue_line("markers", "sanitizer: compute-sanitizer runs, left out by gpu_check.py --no-sanitizer")


@pytest.fixture
def gpu() -> torch.device:
    """The current CUDA device (the tests are skipped without one)."""
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def capability(gpu: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(gpu))  # type: ignore[return-value]


@pytest.fixture
def base_seed() -> int:
    """The base seed of every input ($CRD_FAST_GPU_SEED, else kernel_checks.DEFAULT_SEED); failures print it."""
    return seed()


@pytest.fixture
def require_path(gpu: torch.device):
    """``require_path(spec, path)``: skips the test, with the reason, when backend ``path`` cannot run ``spec`` here."""

    def require(spec: registry.OpSpec, path: str) -> None:
        problem = path_problem(spec, path, gpu)
        if problem is not None:
            pytest.skip(f"{path} cannot run {spec.name} here: {problem}")

    return require
