"""On a GPU: every op with CUDA kernels runs a kernel here (a silent reference run fails), every backend is present,
and no compiled kernel spills to local memory."""

from __future__ import annotations

import pytest
from helpers import cuda

from crd_fast.ops import cuda_dispatch, cuda_launch, native, registry

from .kernel_checks import path_problem

pytestmark = [pytest.mark.cuda, cuda]

KERNEL_OPS = [spec for spec in registry.OPS.values() if spec.kernels is not None]
BACKENDS = [backend.name for backend in cuda_dispatch.BACKENDS]


@pytest.mark.parametrize("spec", KERNEL_OPS, ids=lambda spec: spec.name)
def test_the_op_runs_a_kernel_on_this_device(spec, gpu):
    choice = cuda_dispatch.decide(spec, gpu)
    assert choice.path != "reference", f"{spec.name} takes the reference: {choice.reason}; skipped {choice.skipped}"


@pytest.mark.parametrize("spec", KERNEL_OPS, ids=lambda spec: spec.name)
def test_at_least_one_backend_can_run_the_op(spec, gpu):
    problems = {path: path_problem(spec, path, gpu) for path in spec.launchers}
    assert any(problem is None for problem in problems.values()), problems


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("spec", KERNEL_OPS, ids=lambda spec: spec.name)
def test_every_backend_is_present(spec, path, require_path):
    """Skipped (the check could not run, exit status 3 of bench/gpu_check.py) when a backend is missing here."""
    require_path(spec, path)


def test_compiled_kernels_do_not_spill():
    if not native.has_native_cuda():
        pytest.skip("crd_fast.ops._C has no CUDA kernels")
    attributes = cuda_launch.crd_head_cuda_attributes()
    assert attributes, "the compiled module reports no kernels"
    spilling = [a["name"] for a in attributes if a["local_bytes"]]
    assert not spilling, f"local memory (spills) in {spilling}"
