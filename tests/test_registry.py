"""The op registry (crd_fast/ops/registry.py): the registered schemas are the published ones, and a new op is one
OpSpec and one register() call, with the CPU, CUDA and fake kernels and torch.compile support that come with it."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from crd_fast.ops import cuda_dispatch, head_op, reference, registry, residual_op

SCHEMAS = {
    "crd_head": "crd_fast::crd_head(Tensor[] feature_maps, Tensor matrix, Tensor offset, str embedding, "
    "SymInt target_dim) -> Tensor",
    "crd_residual": "crd_fast::crd_residual(Tensor[] feature_maps, Tensor matrix, Tensor q, str embedding, "
    "SymInt target_dim) -> Tensor",
}


def test_the_registered_schemas_are_the_published_ones():
    assert list(registry.OPS) == list(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert str(registry.OPS[name].torch_op().default._schema) == schema
    assert registry.OPS["crd_head"] is head_op.SPEC and registry.OPS["crd_residual"] is residual_op.SPEC


def _squared_reference(feature_maps, matrix, offset, embedding="concat", target_dim=1024, dtype=torch.float64):
    return reference.crd_head(feature_maps, matrix, offset, embedding, target_dim, dtype=dtype) ** 2


#: A third op, made of a spec alone: no CPU or CUDA kernel of its own, so every device runs its reference.
SQUARED = registry.OpSpec(
    name="crd_test_squared_head",
    schema=head_op.SCHEMA,
    check=head_op.check_head_inputs,
    reference=_squared_reference,
    out_shape=head_op.SPEC.out_shape,
)


@pytest.fixture(scope="module")
def squared_op():
    """SQUARED registered once for this module (a torch op cannot be unregistered); OPS restored afterwards."""
    before = dict(registry.OPS)
    registry.register(SQUARED)
    yield SQUARED.torch_op()
    registry.OPS.clear()
    registry.OPS.update(before)


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)]
    return maps, torch.randn(4, 5, generator=gen), torch.randn(5, generator=gen)


def test_a_new_op_is_one_spec(squared_op, monkeypatch):
    maps, matrix, offset = _inputs(3)
    got = squared_op(maps, matrix, offset, "concat", 1024)
    want = reference.crd_head(maps, matrix, offset) ** 2
    assert got.dtype == torch.float32 and got.shape == (2, 5, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert squared_op([m.double() for m in maps], matrix, offset, "concat", 1024).dtype == torch.float64
    with pytest.raises(ValueError, match="offset must have shape"):  # the spec's checks guard every kernel
        squared_op(maps, matrix, offset[:3], "concat", 1024)
    torch.library.opcheck(squared_op.default, (maps, matrix, offset, "concat", 1024))
    with FakeTensorMode():
        fake = squared_op(
            [torch.empty(2, 3, 5, 4), torch.empty(2, 2, 3, 3)], torch.empty(4, 5), torch.empty(5), "concat", 1
        )
        assert fake.shape == (2, 5, 4)
    # its CUDA kernel: no kernels of its own, so the reference, without asking the dispatch for a path
    monkeypatch.setattr(
        cuda_dispatch, "decide", lambda spec, device: pytest.fail("an op without kernels decides nothing")
    )
    torch.testing.assert_close(registry.cuda_kernel(SQUARED, maps, matrix, offset, "concat", 1024), got)
    compiled = torch.compile(lambda a, b: squared_op([a, b], matrix, offset, "concat", 1024).sum(), backend="eager")
    torch.testing.assert_close(compiled(*maps), got.sum())


def test_a_new_op_is_left_out_of_the_gpu_report_until_it_has_kernels(squared_op, monkeypatch):
    """crd_fast.backends() reports the ops that have CUDA kernels; the squared op has none."""
    seen = []
    monkeypatch.setattr(cuda_dispatch, "device_report", lambda specs: seen.append([s.name for s in specs]) or [])
    import crd_fast

    crd_fast.backends()
    assert seen == [["crd_head", "crd_residual"]]


def test_an_op_name_is_registered_once(squared_op):
    with pytest.raises(ValueError, match="crd_fast::crd_test_squared_head is already registered"):
        registry.register(SQUARED)
