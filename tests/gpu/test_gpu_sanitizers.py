"""On a GPU: compute-sanitizer's memcheck, racecheck, synccheck and initcheck over small launches of every op's
kernels (tests/gpu/sanitizer_target.py), every backend and dtype, filtered to crd-fast's kernels. Skipped when
compute-sanitizer is not found; left out by ``bench/gpu_check.py --no-sanitizer`` (marker ``sanitizer``)."""

from __future__ import annotations

import subprocess
import time

import pytest
from helpers import cuda

from .kernel_checks import SANITIZER_TOOLS, find_sanitizer, sanitizer_command, sanitizer_passed

pytestmark = [pytest.mark.cuda, cuda, pytest.mark.sanitizer]


@pytest.mark.parametrize("tool", SANITIZER_TOOLS)
def test_compute_sanitizer(tool, base_seed):
    sanitizer = find_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin)")
    start = time.time()
    try:
        result = subprocess.run(
            sanitizer_command(sanitizer, tool, base_seed), capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{tool} timed out after 120 s")
    lines = (result.stdout + result.stderr).strip().splitlines()
    note = f"rc={result.returncode} in {time.time() - start:.0f} s; " + " | ".join(lines[-3:])
    assert sanitizer_passed(result.returncode, lines), note[:400]
