"""CRDScorer persistence and bad input: every mistake gets an error that names it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_bank

from crd_fast import CRDScorer, ModelFileError, NNScorer
from crd_fast.io.atomic import atomic_write


@pytest.fixture
def fitted(rng) -> CRDScorer:
    return CRDScorer(lam_rel=0.03).fit(random_bank(rng, 200, 16))


@pytest.mark.parametrize("rank", [None, 6])
@pytest.mark.parametrize("center", [True, False])
def test_save_then_load_gives_identical_scores(tmp_path, rng, rank, center):
    scorer = CRDScorer(lam_rel=0.05, center=center, rank=rank).fit(random_bank(rng, 300, 16))
    path = tmp_path / "model.crd"
    scorer.save(path)
    loaded = CRDScorer.load(path)
    y = torch.from_numpy(random_bank(rng, 64, 16)).float()
    assert torch.equal(loaded.score(y), scorer.score(y))
    assert (loaded.lam_rel, loaded.center, loaded.rank, loaded.n_samples) == (0.05, center, rank, 300)
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_loaded_model_can_keep_learning(tmp_path, rng):
    a, b = random_bank(rng, 150, 10), random_bank(rng, 150, 10)
    CRDScorer().fit(a).save(tmp_path / "m.crd")
    updated = CRDScorer.load(tmp_path / "m.crd").partial_fit(b)
    np.testing.assert_allclose(updated.score(a), CRDScorer().fit(np.vstack([a, b])).score(a), rtol=1e-10)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros(16), ValueError, "2-D"),
        (np.zeros((2, 3, 16)), ValueError, "2-D"),
        (np.zeros((5, 15)), ValueError, "d=15.*d=16"),
        (np.full((3, 16), np.nan), ValueError, "NaN"),
        (np.full((3, 16), np.inf), ValueError, "Inf"),
        (np.zeros((3, 16), dtype=np.int64), TypeError, "floating-point"),
        (torch.zeros(3, 16, dtype=torch.int32), TypeError, "floating-point"),
        ("not an array", TypeError, "torch.Tensor or numpy.ndarray"),
    ],
)
def test_score_rejects_bad_input(fitted, bad, error, match):
    with pytest.raises(error, match=match):
        fitted.score(bad)


@pytest.mark.parametrize(
    "bad, match",
    [(np.zeros((0, 8)), "empty"), (np.ones((1, 8)), "at least 2"), (np.zeros((4, 0)), "zero feature")],
)
def test_fit_rejects_too_little_data(bad, match):
    with pytest.raises(ValueError, match=match):
        CRDScorer().fit(bad)


def test_fit_rejects_identical_patches():
    with pytest.raises(ValueError, match="zero variance"):
        CRDScorer().fit(np.ones((10, 4))).score(np.ones((1, 4)))


def test_unfitted_and_underfitted_scorers_refuse(rng):
    with pytest.raises(RuntimeError, match="not fitted"):
        CRDScorer().score(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        CRDScorer().partial_fit(np.ones((1, 3))).score(np.zeros((2, 3)))


@pytest.mark.parametrize("lam_rel", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_parameters(lam_rel):
    with pytest.raises(ValueError, match="lam_rel"):
        CRDScorer(lam_rel=lam_rel)
    with pytest.raises(ValueError, match="rank"):
        CRDScorer(rank=0)


def test_partial_fit_with_other_dimension(fitted):
    with pytest.raises(ValueError, match="d=8.*d=16"):
        fitted.partial_fit(np.zeros((4, 8)))


def test_model_of_another_d_refuses_data(tmp_path, rng):
    CRDScorer().fit(random_bank(rng, 50, 8)).save(tmp_path / "d8.crd")
    loaded = CRDScorer.load(tmp_path / "d8.crd")
    with pytest.raises(ValueError, match="d=16.*fitted with d=8"):
        loaded.score(random_bank(rng, 3, 16))


def test_truncated_file(tmp_path, fitted):
    path = tmp_path / "m.crd"
    fitted.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"m\.crd.*(truncated|corrupt)"):
        CRDScorer.load(path)


def test_edited_tensor_bytes_fail_checksum(tmp_path, fitted):
    path = tmp_path / "m.crd"
    fitted.save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a byte inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        CRDScorer.load(path)


def _rewrite_metadata(path: Path, edit, signed: bool = False) -> None:
    """Rewrite the JSON metadata of a safetensors file in place (header length prefix kept valid). Unless ``signed``,
    the header digest goes too, as in a file written before header digests: then the field checks speak."""
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    meta = json.loads(header["__metadata__"]["crd_fast"])
    edit(meta)
    if not signed:
        meta.pop("digest", None)
        header["__metadata__"].pop("crd_fast_sha256", None)
    header["__metadata__"]["crd_fast"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + hlen :])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(kind="nn_scorer"), "expected 'crd_scorer'"),
        (lambda m: m.update(lam=123.0), "lam=123"),
        (lambda m: m.update(d=17), "d=17"),
        (lambda m: m.update(n=1), "at least 2"),
        (lambda m: m.update(center=False), "lam=|offset"),
        (lambda m: m.pop("lam_rel"), "lam_rel"),
        (lambda m: m.update(format="something-else"), "not a crd_fast model"),
    ],
)
def test_edited_metadata_is_refused(tmp_path, fitted, edit, match):
    path = tmp_path / "m.crd"
    fitted.save(path)
    _rewrite_metadata(path, edit)
    with pytest.raises(ModelFileError, match=match):
        CRDScorer.load(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(kind="nn_scorer"),
        lambda m: m.update(lam_rel=m["lam_rel"] * 2, lam=m["lam"] * 2),  # consistent with itself, not with the file
        lambda m: m.update(error_bound=0.5),
        lambda m: m.pop("digest"),
        lambda m: m.update(digest="tensors"),
    ],
)
def test_edited_header_of_a_signed_file_is_refused(tmp_path, fitted, edit):
    """The header digest covers every field: an edit is refused even where the fields stay consistent."""
    path = tmp_path / "m.crd"
    fitted.save(path)
    _rewrite_metadata(path, edit, signed=True)
    with pytest.raises(ModelFileError, match="header|digest"):
        CRDScorer.load(path)


def test_missing_and_foreign_files(tmp_path, rng):
    with pytest.raises(ModelFileError, match="no such model file"):
        CRDScorer.load(tmp_path / "absent.crd")
    (tmp_path / "junk.crd").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="junk.crd"):
        CRDScorer.load(tmp_path / "junk.crd")
    NNScorer().fit(random_bank(rng, 10, 4)).save(tmp_path / "nn.crd")
    with pytest.raises(ModelFileError, match="nn_scorer"):
        CRDScorer.load(tmp_path / "nn.crd")


def test_failed_write_keeps_previous_file(tmp_path, fitted):
    path = tmp_path / "m.crd"
    fitted.save(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half a model")
            raise RuntimeError("disk full")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.crd"]


class _Booby:
    """Unpickling this object creates the file named in it: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _loaders():
    from crd_fast import CRDDetector
    from crd_fast.deploy import DeployHead, LocalDeployHead

    return {
        "CRDScorer": CRDScorer.load,
        "NNScorer": NNScorer.load,
        "CRDDetector": CRDDetector.load,
        "DeployHead": DeployHead.load,
        "LocalDeployHead": LocalDeployHead.load,
    }


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("loader", ["CRDScorer", "NNScorer", "CRDDetector", "DeployHead", "LocalDeployHead"])
def test_pickled_files_are_refused_without_unpickling(tmp_path, writer, loader):
    """Model files are safetensors + JSON: a pickle in their place is refused, and its code never runs."""
    import pickle

    marker, path = tmp_path / "unpickled", tmp_path / "model.crd"
    payload = {"crd.mean": _Booby(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ModelFileError, match=r"model\.crd.*(truncated|corrupt)"):
        _loaders()[loader](path)
    assert not marker.exists()
    with open(path, "rb") as fh:  # the file really is a live pickle: loading it with pickle runs the payload
        if writer == "torch.save":
            torch.load(fh, weights_only=False)
        else:
            pickle.load(fh)
    assert marker.exists()
