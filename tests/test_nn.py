"""NNScorer: exact nearest-neighbour distances through faiss and chunked torch, same interface as CRDScorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_bank

from crd_fast import ModelFileError, NNScorer


def brute_force(bank: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(((y[:, None, :] - bank[None, :, :]) ** 2).sum(-1)).min(axis=1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_nearest_neighbour_distance(rng, backend):
    bank = random_bank(rng, 700, 12).astype(np.float32)
    y = random_bank(rng, 90, 12).astype(np.float32)
    scorer = NNScorer(backend=backend, query_chunk=17, bank_chunk=64).fit(bank)
    np.testing.assert_allclose(
        scorer.score(y), brute_force(bank.astype(np.float64), y.astype(np.float64)), rtol=1e-4, atol=1e-4
    )


def test_float64_torch_path_is_exact(rng):
    bank, y = random_bank(rng, 300, 6), random_bank(rng, 40, 6)
    got = NNScorer(backend="torch").fit(torch.from_numpy(bank)).score(torch.from_numpy(y))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), brute_force(bank.astype(np.float32).astype(np.float64), y), rtol=1e-6)


def test_training_patches_score_zero(rng):
    bank = random_bank(rng, 200, 8).astype(np.float32)
    assert float(np.max(NNScorer().fit(bank).score(bank))) < 1e-3


def test_subsample_keeps_seeded_fraction(rng):
    bank = random_bank(rng, 1000, 4)
    a = NNScorer(subsample=0.1, seed=3).fit(bank)
    b = NNScorer(subsample=0.1, seed=3).fit(bank)
    assert a.n_samples == 100 and torch.equal(a.bank, b.bank)
    # every kept row is a training row
    assert np.isin(
        a.bank.numpy().view([("", np.float32)] * 4), bank.astype(np.float32).view([("", np.float32)] * 4)
    ).all()
    assert a.nbytes == 100 * 4 * 4


def test_partial_fit_appends(rng):
    a, b = random_bank(rng, 50, 4), random_bank(rng, 30, 4)
    y = random_bank(rng, 10, 4)
    np.testing.assert_allclose(
        NNScorer().fit(a).partial_fit(b).score(y), NNScorer().fit(np.vstack([a, b])).score(y), rtol=1e-6
    )


def test_save_load_and_errors(tmp_path, rng):
    scorer = NNScorer().fit(random_bank(rng, 40, 5))
    scorer.save(tmp_path / "nn.safetensors")
    loaded = NNScorer.load(tmp_path / "nn.safetensors")
    y = random_bank(rng, 7, 5)
    np.testing.assert_array_equal(loaded.score(y), scorer.score(y))
    with pytest.raises(ValueError, match="d=4.*d=5"):
        loaded.score(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="subsample"):
        NNScorer(subsample=0.0)
    with pytest.raises(ValueError, match="backend"):
        NNScorer(backend="annoy")
    with pytest.raises(RuntimeError, match="not fitted"):
        NNScorer().score(np.zeros((1, 3)))
    data = (tmp_path / "nn.safetensors").read_bytes()
    (tmp_path / "nn.safetensors").write_bytes(data[:-10])
    with pytest.raises(ModelFileError):
        NNScorer.load(tmp_path / "nn.safetensors")
