"""all_finite (crd_fast/core/finite.py): the NaN/Inf test every input and overflow check uses."""

import pytest
import torch

from crd_fast.core.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_value_anywhere_is_found(dtype, bad):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(257, 131, generator=gen).to(dtype)
    assert all_finite(x)
    for flat in (0, 1234, x.numel() - 1, int(torch.randint(x.numel(), (1,), generator=gen))):
        y = x.clone()
        y.view(-1)[flat] = bad
        assert not all_finite(y), (dtype, bad, flat)
        assert all_finite(y) == bool(torch.isfinite(y).all())
    # in a non-contiguous view too
    y = x.clone()
    y[100, 3] = bad
    assert not all_finite(y.T) and all_finite(y[:100])


def test_extremes_that_are_finite_pass():
    big = torch.finfo(torch.float32).max
    assert all_finite(torch.tensor([big, -big, 0.0, torch.finfo(torch.float32).tiny]))
    assert not all_finite(torch.tensor([big]) * 2)  # overflowed to Inf


def test_empty_integer_bool_and_complex():
    assert all_finite(torch.empty(0, 7))
    assert all_finite(torch.arange(10)) and all_finite(torch.ones(3, dtype=torch.bool))
    z = torch.zeros(4, dtype=torch.complex64)
    assert all_finite(z)
    z[2] = complex(0.0, float("inf"))
    assert not all_finite(z)


def test_falls_back_to_the_plain_test_where_aminmax_is_missing(monkeypatch):
    def missing(*args, **kwargs):
        raise NotImplementedError("aminmax is not implemented for this backend")

    monkeypatch.setattr(torch, "aminmax", missing)
    x = torch.randn(50, 7)
    assert all_finite(x)
    x[3, 4] = float("nan")
    assert not all_finite(x)
