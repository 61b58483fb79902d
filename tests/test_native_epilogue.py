"""The compiled residual-norm epilogue against torch, the scorer with and without it, and import without _C."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import cuda, random_bank

import crd_fast
from crd_fast import CRDScorer
from crd_fast.ops import native

needs_native = pytest.mark.skipif(not native.has_native(), reason="crd_fast.ops._C not built")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 3), (300, 1536), (5000, 40)])
def test_residual_norm_matches_torch(dtype, rows, cols):
    g = torch.Generator().manual_seed(rows * 31 + cols)
    z = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    q = torch.randn(cols, generator=g, dtype=torch.float64)
    expected = torch.linalg.vector_norm(z - q, dim=1)
    got = native.residual_norm(z.to(dtype), q.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
    torch.testing.assert_close(
        native.residual_norm(z.to(dtype)).double(), torch.linalg.vector_norm(z, dim=1), rtol=1e-6, atol=0
    )


@needs_native
def test_residual_norm_checks_before_pointers():
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="shape"):
        native.residual_norm(z, torch.zeros(4))
    with pytest.raises(ValueError, match="dtype"):
        native.residual_norm(z, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        native.residual_norm(z.half())
    # non-contiguous input is made contiguous, not misread
    zt = torch.randn(3, 4).T
    torch.testing.assert_close(native.residual_norm(zt), torch.linalg.vector_norm(zt, dim=1))


def test_scorer_native_and_torch_paths_agree(rng, monkeypatch):
    bank = random_bank(rng, 500, 64).astype(np.float32)
    y = torch.from_numpy(random_bank(rng, 300, 64).astype(np.float32))
    scorer = CRDScorer().fit(bank)
    with_native = scorer.score(y)
    monkeypatch.setattr(native, "has_native", lambda: False)
    torch.testing.assert_close(scorer.score(y), with_native, rtol=1e-5, atol=1e-6)


def test_import_and_score_without_compiled_module():
    code = (
        "import sys; sys.modules['crd_fast.ops._C'] = None\n"
        "import numpy as np, crd_fast\n"
        "assert crd_fast.backends()['native'] is False\n"
        "s = crd_fast.CRDScorer().fit(np.random.default_rng(0).standard_normal((50, 4)))\n"
        "print(s.score(np.zeros((2, 4))).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(2,)" in out.stdout


def test_build_has_the_expected_kernels():
    """scripts/test.sh sets these after a pip install, so a build that lost its kernels fails here."""
    if not os.environ.get("CRD_FAST_EXPECT_NATIVE") and not os.environ.get("CRD_FAST_EXPECT_CUDA_KERNELS"):
        pytest.skip("CRD_FAST_EXPECT_NATIVE and CRD_FAST_EXPECT_CUDA_KERNELS are unset: no expected build to check")
    if os.environ.get("CRD_FAST_EXPECT_NATIVE"):
        assert native.has_native(), crd_fast.backends()["native_error"]
    expect_cuda = os.environ.get("CRD_FAST_EXPECT_CUDA_KERNELS")
    if expect_cuda == "1":
        assert native.has_native_cuda(), "nvcc was found but the installed build has no CUDA kernels"
    elif expect_cuda == "0":
        assert not native.has_native_cuda(), "a CPU-only build (CRD_FAST_CUDA=OFF) contains CUDA kernels"


def test_backends_reports_build():
    info = crd_fast.backends()
    assert {"native", "cuda_kernels", "cuda_device", "faiss", "cupy", "torch"} <= set(info)
    if info["cuda_kernels"]:
        assert info["native"] and info["cuda_kernels_version"]


@cuda
def test_cuda_scores_match_cpu(rng):
    bank = random_bank(rng, 500, 32).astype(np.float32)
    scorer = CRDScorer().fit(bank)
    y = torch.from_numpy(bank[:100])
    got = scorer.score(y.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), scorer.score(y), rtol=1e-4, atol=1e-5)
