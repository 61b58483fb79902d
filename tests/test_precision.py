"""Half-precision and rank-r head files: stored as declared, checked on load, errors bounded and measured."""

from __future__ import annotations

import pytest
import torch
from helpers import random_bank

from crd_fast import CRDScorer, ModelFileError
from crd_fast.deploy import DeployHead, make_head_file, measure_error, variant_projection
from crd_fast.deploy.head_files import head_from
from crd_fast.io.model_file import write_model_file
from crd_fast.models.head_file import deployed_scores, round_matrix


@pytest.fixture
def scorer(rng):
    return CRDScorer().fit(random_bank(rng, 3000, 48, offset=2.0))


def exact_scores(scorer: CRDScorer, y: torch.Tensor) -> torch.Tensor:
    proj = variant_projection(scorer, "fp64", None)
    return torch.linalg.vector_norm((y.double() - proj.offset) @ proj.matrix.T, dim=1)


def test_round_matrix_is_round_to_nearest(rng):
    m = torch.from_numpy(rng.uniform(-1, 1, (40, 40)))
    r16 = round_matrix(m, "fp16")
    assert r16.dtype == torch.float64 and torch.equal(r16, r16.half().double())
    assert float(((r16 - m).abs() / m.abs()).max()) <= 2.0**-11  # half an ulp of an 11-bit significand
    assert torch.equal(round_matrix(m, "fp64"), m)
    with pytest.raises(ValueError, match="does not fit in fp16"):
        round_matrix(m * 1e6, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        round_matrix(m, "bf8")


@pytest.mark.parametrize("precision", ["fp64", "fp32", "fp16"])
@pytest.mark.parametrize("rank", [None, 20])
def test_head_file_round_trip(scorer, tmp_path, precision, rank):
    path = tmp_path / "head.crdh"
    head = make_head_file(scorer, path, precision=precision, rank=rank)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        stored = fh.get_tensor("matrix")
    assert stored.dtype == {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16}[precision]
    assert stored.shape == ((rank or 48), 48)
    loaded = DeployHead.load(path, precision=precision, rank=rank)
    assert torch.equal(loaded.matrix, head.matrix) and torch.equal(loaded.offset, scorer.mean)
    assert (loaded.precision, loaded.rank, loaded.lam) == (precision, rank, scorer.lam)
    assert loaded.error_bound == pytest.approx(variant_projection(scorer, "fp64", rank).error_bound)
    with pytest.raises(ValueError, match="expected fp"):
        DeployHead.load(path, precision="fp32" if precision != "fp32" else "fp16")
    with pytest.raises(ValueError, match="expected 7"):
        DeployHead.load(path, rank=7)


def test_head_file_sizes_shrink(scorer, tmp_path):
    sizes = {}
    for precision, rank in (("fp64", None), ("fp16", None), ("fp16", 12)):
        path = tmp_path / f"{precision}_{rank}.crdh"
        make_head_file(scorer, path, precision, rank)
        sizes[precision, rank] = path.stat().st_size
    matrix_fp64 = 48 * 48 * 8
    assert sizes["fp64", None] - sizes["fp16", None] == pytest.approx(matrix_fp64 * 3 / 4, abs=64)
    assert sizes["fp16", 12] < sizes["fp16", None]


def test_inconsistent_head_files_are_refused(scorer, tmp_path):
    head = DeployHead.from_scorer(scorer, "fp16")
    fields = {"precision": "fp32", "rank": None, "d": 48, "r": 48, "lam": head.lam, "n": 3000}
    tensors = {"matrix": head.matrix.half(), "offset": head.offset}
    write_model_file(tmp_path / "a.crdh", "crd_head", tensors, fields, check=None)  # corrupt on purpose
    with pytest.raises(ModelFileError, match="matrix is torch.float16 but the metadata says precision=fp32"):
        DeployHead.load(tmp_path / "a.crdh")
    fields = {**fields, "precision": "fp16", "rank": 10}
    write_model_file(tmp_path / "b.crdh", "crd_head", tensors, fields, check=None)
    with pytest.raises(ModelFileError, match=r"matrix shape \(48, 48\), expected \(10, 48\)"):
        DeployHead.load(tmp_path / "b.crdh")
    scorer.save(tmp_path / "scorer.crd")
    with pytest.raises(ModelFileError, match="holds a 'crd_scorer' model, expected 'crd_head'"):
        DeployHead.load(tmp_path / "scorer.crd")
    # ...but a scorer file is a valid source for making a head file
    assert torch.equal(head_from(tmp_path / "scorer.crd", "fp16").matrix, head.matrix)


def test_fp64_head_is_exact_and_fp16_error_is_bounded(scorer, rng):
    y = torch.from_numpy(random_bank(rng, 500, 48, offset=2.0) + rng.standard_normal((500, 48)))
    exact = exact_scores(scorer, y)
    full = DeployHead.from_scorer(scorer, "fp64")
    torch.testing.assert_close(full.score(y, torch.float64), exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(full.score(y, torch.float64), scorer.score(y), rtol=1e-10, atol=0)
    half = DeployHead.from_scorer(scorer, "fp16")
    # |s16(y) - s(y)| <= ||(M16 - M)(y - mu)|| <= ||M16 - M||_2 ||y - mu||   (triangle inequality)
    delta = torch.linalg.matrix_norm(half.matrix - full.matrix, ord=2)
    err = (half.score(y, torch.float64) - exact).abs()
    assert bool((err <= delta * torch.linalg.vector_norm(y - full.offset, dim=1) * (1 + 1e-9)).all())
    assert float(err.max()) > 0


def test_rank_r_error_within_bound(scorer, rng):
    y = torch.from_numpy(random_bank(rng, 500, 48, offset=2.0) + rng.standard_normal((500, 48)))
    exact = exact_scores(scorer, y)
    for rank in (8, 24, 47):
        head = DeployHead.from_scorer(scorer, "fp64", rank)
        drop = exact - head.score(y, torch.float64)
        bound = head.error_bound * torch.linalg.vector_norm(y - head.offset, dim=1)
        assert bool((drop >= -1e-12).all()) and bool((drop <= bound + 1e-12).all())
    assert DeployHead.from_scorer(scorer, "fp64", 48).rank is None  # rank >= d is the exact M_pre


def test_measure_error(scorer, rng):
    patches = torch.from_numpy(random_bank(rng, 16 * 25, 48, offset=2.0)).float()
    fp32 = measure_error(scorer, patches, 25, "fp32")
    fp16 = measure_error(scorer, patches, 25, "fp16")
    low = measure_error(scorer, patches, 25, "fp32", rank=24)
    assert fp32["patch_max_rel"] < 1e-5 and fp32["image_max_rel"] <= fp32["patch_max_rel"] + 1e-12
    assert 1e-6 < fp16["patch_max_rel"] < 5e-3 and fp16["patch_mean_rel"] <= fp16["patch_max_rel"]
    assert low["rank"] == 24 and low["patch_mean_rel"] > fp16["patch_mean_rel"] and low["error_bound"] > 0
    assert fp16["matrix_bytes"] * 2 == fp32["matrix_bytes"] == 2 * low["matrix_bytes"]
    # the folded float32 form the runtime uses (||M y - M mu||) agrees with the float64 score
    proj = variant_projection(scorer, "fp64", None)
    torch.testing.assert_close(
        deployed_scores(patches, proj.matrix, proj.offset).double(),
        exact_scores(scorer, patches.double()),
        rtol=1e-4,
        atol=0,
    )
    with pytest.raises(ValueError, match="n_images \\* 25"):
        measure_error(scorer, patches[:-1], 25)


def test_rank_for_error_bound(scorer):
    from crd_fast.deploy import rank_for_error_bound

    for bound in (0.9, 0.5, 0.2):
        r = rank_for_error_bound(scorer, bound)
        if r is None:
            continue
        assert variant_projection(scorer, "fp64", r).error_bound <= bound
        if r > 1:
            assert variant_projection(scorer, "fp64", r - 1).error_bound > bound
    assert rank_for_error_bound(scorer, 1e-12) is None
    with pytest.raises(ValueError, match="bound"):
        rank_for_error_bound(scorer, 1.5)
