"""On a GPU: every op on a side stream behind ``torch.cuda._sleep`` with stream-level waits only, inside CUDA-graph
capture and replay on new inputs, and under ``torch.compile(mode="reduce-overhead")`` (docs/GPU.md "Caches and
streams")."""

from __future__ import annotations

import pytest
import torch
from helpers import cuda

from .kernel_checks import CHECKS, TOLERANCES, norm_rel

pytestmark = [pytest.mark.cuda, cuda]

SHAPES = [(4, 32, 20, 20), (4, 48, 10, 10)]
TOL = TOLERANCES["float32"]


def _inputs(op, gpu, seed):
    """float32 device (maps, matrix, second) and the float64 reference on the same float32 maps."""
    check = CHECKS[op]
    maps64, matrix, second = check.inputs(seed, SHAPES, 40)
    maps = [m.float().to(gpu) for m in maps64]
    want = check.spec.reference([m.float() for m in maps64], matrix, second, "concat", 1024)
    return maps, matrix.float().to(gpu), second.float().to(gpu), want


@pytest.mark.parametrize("op", list(CHECKS))
def test_a_side_stream_behind_a_sleep(op, gpu, base_seed):
    call = CHECKS[op].spec.torch_op()
    maps, matrix, second, want = _inputs(op, gpu, base_seed + 400)
    call(maps, matrix, second, "concat", 1024)  # prepared (tables, folds) on the default stream
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps the side stream busy while the host moves on
        fresh = [m * 1.0 for m in maps]  # made on the side stream, after the sleep
        got = call(fresh, matrix, second, "concat", 1024)
    torch.cuda.current_stream().wait_stream(side)  # stream-level wait only, no device synchronize
    assert norm_rel(got.cpu(), want) < TOL, norm_rel(got.cpu(), want)


@pytest.mark.parametrize("op", list(CHECKS))
def test_cuda_graph_capture_and_replay_on_new_inputs(op, gpu, base_seed):
    check = CHECKS[op]
    call = check.spec.torch_op()
    maps, matrix, second, _ = _inputs(op, gpu, base_seed + 400)
    static = [m.clone() for m in maps]
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture_stream):
        call(static, matrix, second, "concat", 1024)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(capture_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call(static, matrix, second, "concat", 1024)
    new64, _, _ = check.inputs(base_seed + 401, SHAPES, 40)
    for s, n in zip(static, new64):
        s.copy_(n.float())
    graph.replay()
    torch.cuda.synchronize()
    m64, s64 = matrix.double().cpu(), second.double().cpu()
    want = check.spec.reference([n.float() for n in new64], m64, s64, "concat", 1024)
    assert norm_rel(static_out.cpu(), want) < TOL, norm_rel(static_out.cpu(), want)


@pytest.mark.parametrize("op", list(CHECKS))
def test_torch_compile_reduce_overhead(op, gpu, base_seed):
    call = CHECKS[op].spec.torch_op()
    maps, matrix, second, want = _inputs(op, gpu, base_seed + 400)
    compiled = torch.compile(
        lambda a, b: call([a, b], matrix, second, "concat", 1024).amax(dim=(1, 2)), mode="reduce-overhead"
    )
    for _ in range(3):  # cudagraph trees record on the later calls
        out = compiled(*maps)
    torch.cuda.synchronize()
    assert norm_rel(out.cpu(), want.amax(dim=(1, 2))) < TOL, norm_rel(out.cpu(), want.amax(dim=(1, 2)))
