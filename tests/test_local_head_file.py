"""Local head files (kind "local_crd_head") against float64 direct computations; corrupt files; ONNX export.

Tolerances (relative, patch by patch, against the exact float64 local model): 1e-12 for an fp64 file scored in
float64 (measured about 4e-15), 1e-6 for fp32 storage scored in float64 (measured about 2e-7), 1e-5 for any
storage scored in float32 (measured about 2e-6), 1e-2 for fp16 storage (measured about 2e-3); 1e-9 for a
rank-r head against the dense float64 formula of the rank-r model; ONNX as in tests/test_export.py.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import dense_local_scores

from crd_fast.core.embedding import embed_patches, patch_matrix
from crd_fast.deploy import DeployHead, export_onnx, head_from, load_head_file, make_head_file
from crd_fast.deploy.head_errors import measure_local_error
from crd_fast.io.model_file import ModelFileError, read_model_file, write_model_file
from crd_fast.models.local_head_file import LOCAL_HEAD_KIND, LocalDeployHead
from crd_fast.scorers import CRDScorer
from crd_fast.scorers.local import LocalCRDScorer

N_TRAIN, P, D, K = 40, 12, 16, 6


def _grids(seed: int, n: int, p: int = P, d: int = D) -> torch.Tensor:
    """Aligned-part-like grids: a fixed pattern per position plus position-dependent low-rank variation and noise."""
    g = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(1, p, d, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    basis = torch.randn(p, d, 4, generator=torch.Generator().manual_seed(101), dtype=torch.float64)
    coef = torch.randn(n, p, 4, generator=g, dtype=torch.float64)
    return (
        base + torch.einsum("pdk,npk->npd", basis, coef) + 0.3 * torch.randn(n, p, d, generator=g, dtype=torch.float64)
    )


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want) / want).abs().max())


@pytest.fixture(scope="module")
def train():
    return _grids(0, N_TRAIN)


@pytest.fixture(scope="module")
def test_grids():
    return _grids(1, 7)


def _scorer(train, shrinkage=0.5, lam_rel=0.01, rank=K):
    return LocalCRDScorer(lam_rel=lam_rel, shrinkage=shrinkage, rank=rank, sketch=64).fit(train)


@pytest.mark.parametrize("shrinkage", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lam_rel", [0.01, 1e-4])
def test_fp64_head_scores_are_the_float64_model(train, test_grids, shrinkage, lam_rel):
    scorer = _scorer(train, shrinkage, lam_rel)
    head = LocalDeployHead.from_scorer(scorer, "fp64", grid=(3, 4))
    exact = scorer.model().scores(test_grids, lam_rel)
    assert _rel(head.score(test_grids, torch.float64), exact) < 1e-12
    assert (
        _rel(head.score(test_grids, torch.float64), dense_local_scores(train, test_grids, shrinkage, K, lam_rel)) < 1e-9
    )
    assert _rel(head.score(test_grids), exact) < 1e-5  # float32 compute, as deployed
    assert head.grid == (3, 4) and head.rank == head.model_rank == K and head.lam == scorer.lam()
    with pytest.raises(ValueError, match=r"grids must be an \(N, P=12, d=16\) tensor, got \(7, 12, 15\)"):
        head.score(test_grids[:, :, :15])


@pytest.mark.parametrize("lam_rel", [0.01, 1e-4])
def test_fp32_and_fp16_storage_within_tolerance(train, test_grids, lam_rel):
    scorer = _scorer(train, lam_rel=lam_rel)
    exact = scorer.model().scores(test_grids, lam_rel)
    for precision, tol64, tol32 in (("fp32", 1e-6, 1e-5), ("fp16", 1e-2, 1e-2)):
        head = LocalDeployHead.from_scorer(scorer, precision)
        assert head.matrix.dtype == head.vectors.dtype == torch.float64  # holding exactly the stored values
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
        for t in (head.matrix, head.vectors, head.inner):
            assert torch.equal(t.to(dtype).double(), t)
        err64 = _rel(head.score(test_grids, torch.float64), exact)
        assert 0 < err64 < tol64
        assert _rel(head.score(test_grids), exact) < tol32
        report = measure_local_error(scorer, test_grids, precision, compute_dtype=torch.float64)
        assert report["patch_max_rel"] == pytest.approx(err64, rel=1e-6) and report["rank"] == K
        assert report["image_max_rel"] <= report["patch_max_rel"] * 1.001 + 1e-15
    fp16 = measure_local_error(scorer, test_grids, "fp16")
    fp32 = measure_local_error(scorer, test_grids, "fp32")
    assert fp16["stored_bytes"] < fp32["stored_bytes"] and fp16["patch_max_rel"] > fp32["patch_max_rel"]


def test_rank_keeps_top_per_position_directions(train, test_grids):
    scorer = _scorer(train, shrinkage=0.3, lam_rel=0.003)
    full = LocalDeployHead.from_scorer(scorer, "fp64", rank=K)
    assert _rel(full.score(test_grids, torch.float64), scorer.model().scores(test_grids, 0.003)) < 1e-12
    for r in (1, 3):
        head = LocalDeployHead.from_scorer(scorer, "fp64", rank=r)
        assert head.rank == r and head.model_rank == K and head.vectors.shape == (P, D, r)
        dense = dense_local_scores(train, test_grids, 0.3, r, 0.003)
        assert _rel(head.score(test_grids, torch.float64), dense) < 1e-9
        # the same as the scorer fitted at rank r (its top-r eigenpairs are the same)
        at_r = _scorer(train, 0.3, 0.003, rank=r).model().scores(test_grids, 0.003)
        assert _rel(head.score(test_grids, torch.float64), at_r) < 1e-9
        err = measure_local_error(scorer, test_grids, "fp64", rank=r, compute_dtype=torch.float64)
        assert err["patch_max_rel"] == pytest.approx(_rel(dense, scorer.model().scores(test_grids, 0.003)), rel=1e-6)
    for bad in (0, K + 1, 2.0, True):
        with pytest.raises(ValueError, match=rf"rank of a local head must be an integer in \[1, {K}\]"):
            LocalDeployHead.from_scorer(scorer, "fp64", rank=bad)


def test_global_rank_and_local_rank_are_refused_across_kinds(train, tmp_path):
    scorer = _scorer(train)
    with pytest.raises(ValueError, match="no such form: pass local_rank="):
        head_from(scorer, "fp16", rank=4)
    with pytest.raises(TypeError, match="use LocalDeployHead"):
        DeployHead.from_scorer(scorer)
    local = head_from(scorer, "fp16", local_rank=2)
    assert isinstance(local, LocalDeployHead) and local.rank == 2 and local.precision == "fp16"
    scorer.save(tmp_path / "local.crd")  # a local scorer file gives a local head file too
    written = make_head_file(tmp_path / "local.crd", tmp_path / "h.crdh", precision="fp32", local_rank=3)
    assert isinstance(written, LocalDeployHead) and LocalDeployHead.load(tmp_path / "h.crdh").rank == 3
    pooled = CRDScorer.from_statistics(scorer.pooled_statistics)
    with pytest.raises(ValueError, match="scores with the global CRD: use rank="):
        head_from(pooled, local_rank=2)
    with pytest.raises(ValueError, match="rank of a local head"):
        head_from(scorer, local_rank=K + 1)


@pytest.mark.parametrize("precision", ["fp64", "fp32", "fp16"])
def test_save_load_identity(train, test_grids, tmp_path, precision):
    detector = {"d": D, "patch_grid": [4, 3], "layers": ["x"], "threshold": 1.5}
    head = LocalDeployHead.from_scorer(_scorer(train), precision, rank=4, detector=detector)
    assert head.grid == (4, 3)  # from the detector metadata
    path = tmp_path / "local.crdh"
    head.save(path)
    tensors, meta = read_model_file(path, LOCAL_HEAD_KIND)
    want = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16}[precision]
    assert tensors["matrix"].dtype == tensors["vectors"].dtype == tensors["inner"].dtype == want
    assert tensors["means"].dtype == tensors["inv_b"].dtype == torch.float64
    loaded = LocalDeployHead.load(path, precision=precision, rank=4)
    for name in ("matrix", "means", "inv_b", "vectors", "inner"):
        assert torch.equal(getattr(loaded, name), getattr(head, name)), name
    for name in ("lam", "lam_rel", "shrinkage", "grid", "precision", "model_rank", "n_images", "detector"):
        assert getattr(loaded, name) == getattr(head, name), name
    assert torch.equal(loaded.score(test_grids), head.score(test_grids))
    generic = load_head_file(path)
    assert isinstance(generic, LocalDeployHead) and torch.equal(generic.vectors, head.vectors)
    with pytest.raises(ValueError, match="holds precision="):
        LocalDeployHead.load(path, precision="fp32" if precision != "fp32" else "fp16")
    with pytest.raises(ValueError, match="keeps rank=4 of 6, expected None"):
        LocalDeployHead.load(path, rank=None)


def test_load_head_file_reads_both_kinds(train, tmp_path):
    pooled = CRDScorer.from_statistics(_scorer(train).pooled_statistics)
    make_head_file(pooled, tmp_path / "g.crdh", precision="fp16")
    assert isinstance(load_head_file(tmp_path / "g.crdh"), DeployHead)
    with pytest.raises(ModelFileError, match="holds a 'crd_head' model, expected 'local_crd_head'"):
        LocalDeployHead.load(tmp_path / "g.crdh")
    pooled.save(tmp_path / "scorer.crd")
    with pytest.raises(ModelFileError, match="holds a 'crd_scorer' model"):
        load_head_file(tmp_path / "scorer.crd")


def _tamper(path, out, tensors=None, fields=None, drop=()):
    """Rewrite a head file with some tensors or fields changed (a fresh checksum: only the content is wrong)."""
    t, meta = read_model_file(path, LOCAL_HEAD_KIND)
    t.update(tensors or {})
    for name in drop:
        t.pop(name)
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "crd_fast_version", "kind")}
    meta.pop("checksum")
    meta.update(fields or {})
    write_model_file(out, LOCAL_HEAD_KIND, t, meta, check=None)  # corrupt on purpose: no load-time check
    return out


def test_corrupt_files_are_refused(train, tmp_path):
    path = tmp_path / "ok.crdh"
    head = LocalDeployHead.from_scorer(_scorer(train), "fp16", rank=4)
    head.save(path)
    t, _ = read_model_file(path, LOCAL_HEAD_KIND)
    nan_means = t["means"].clone()
    nan_means[2, 3] = float("nan")
    asym = t["inner"].clone()
    asym[0, 0, 1] += 0.25
    big_inv_b = t["inv_b"].clone()
    big_inv_b[0] = 2 / head.lam
    cases = [
        ({"tensors": {"vectors": t["vectors"][:, :, :3]}}, r"tensor 'vectors' has shape \(12, 16, 3\), expected"),
        ({"tensors": {"matrix": t["matrix"].float()}}, r"tensor 'matrix' is torch.float32, expected torch.float16"),
        ({"tensors": {"means": t["means"].float()}}, r"tensor 'means' is torch.float32, expected torch.float64"),
        ({"fields": {"precision": "fp32"}}, r"tensor 'matrix' is torch.float16, expected torch.float32"),
        ({"tensors": {"means": nan_means}}, "tensor 'means' holds NaN or Inf"),
        ({"drop": ["inner"]}, r"tensors \['inner'\] are missing"),
        ({"tensors": {"extra": torch.zeros(2)}}, r"unexpected tensors \['extra'\]"),
        ({"tensors": {"inner": asym}}, "tensor 'inner' is not symmetric"),
        ({"tensors": {"inv_b": big_inv_b}}, r"inv_b must lie in \(0, 1/lam\]"),
        ({"fields": {"precision": "bf16"}}, "precision 'bf16' is not one of"),
        ({"fields": {"rank": 5}}, r"tensor 'vectors' has shape \(12, 16, 4\), expected \(12, 16, 5\)"),
        ({"fields": {"rank": 7}}, r"rank=7 is not an integer in \[1, 6\]"),
        ({"fields": {"d": 0}}, r"d=0 is not an integer in \[1, "),
        ({"fields": {"grid": [5, 3]}}, r"grid=\[5, 3\] is not null or \[h, w\] with h \* w = positions = 12"),
        ({"fields": {"lam": -1.0}}, r"lam=-1.0 is not a finite number in \(0.0, inf\]"),
        ({"fields": {"shrinkage": 1.5}}, r"shrinkage=1.5 is not a finite number in \[0.0, 1.0\]"),
        ({"fields": {"lam_rel": None}}, "lam_rel=None is not a finite number"),
        ({"fields": {"detector": {"d": 8}}}, "detector metadata says d=8, file d=16"),
        ({"fields": {"detector": [1]}}, "detector metadata is not a JSON object"),
    ]
    for i, (change, message) in enumerate(cases):
        bad = _tamper(path, tmp_path / f"bad{i}.crdh", **change)
        with pytest.raises(ModelFileError, match=message):
            LocalDeployHead.load(bad)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the tensor bytes
    (tmp_path / "flipped.crdh").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        LocalDeployHead.load(tmp_path / "flipped.crdh")
    with pytest.raises(ModelFileError, match="no such model file"):
        load_head_file(tmp_path / "missing.crdh")


def test_fp16_overflow_is_refused(train):
    scorer = _scorer(train * 1e6)  # S_p entries ~ 1e6 sqrt(eigenvalues): beyond float16's 65504
    with pytest.raises(ValueError, match="the local head's vectors does not fit in fp16"):
        LocalDeployHead.from_scorer(scorer, "fp16")
    LocalDeployHead.from_scorer(scorer, "fp32")


# ---- the torch head and ONNX export ------------------------------------------------------------------------
SPECS = ((6, 4, 5), (5, 2, 3))  # (C, H, W) per layer: a 4x5 patch grid, d = 11 with the concat embedding
TARGET_DIM = 8


def _maps(seed, n, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(200)
    return [
        3 * torch.randn(1, c, h, w, generator=fixed, dtype=dtype) + torch.randn(n, c, h, w, generator=g, dtype=dtype)
        for c, h, w in SPECS
    ]


def _map_grids(maps):
    emb = embed_patches([m.double() for m in maps], "concat", TARGET_DIM)
    b, d, h, w = emb.shape
    return patch_matrix(emb).reshape(b, h * w, d)


@pytest.fixture(scope="module")
def map_head():
    scorer = LocalCRDScorer(lam_rel=0.01, shrinkage=0.5, rank=4, sketch=64).fit(_map_grids(_maps(0, 30)))
    info = {
        "layers": ["layer2", "layer3"],
        "layer_channels": [c for c, _, _ in SPECS],
        "feature_shapes": [list(s) for s in SPECS],
        "patch_grid": [4, 5],
        "embedding": "concat",
        "target_dim": TARGET_DIM,
        "d": sum(c for c, _, _ in SPECS),
    }
    return scorer, info


@pytest.mark.parametrize("precision", ["fp64", "fp16"])
def test_head_module_holds_the_stored_values(map_head, precision):
    scorer, info = map_head
    lhead = LocalDeployHead.from_scorer(scorer, precision, detector=info)
    maps = _maps(1, 3)
    want = lhead.score(_map_grids(maps), torch.float64).reshape(3, 4, 5)
    module = lhead.head(dtype=torch.float64)
    for name, stored in (("vectors", lhead.vectors), ("inner", lhead.inner), ("inv_b", lhead.inv_b)):
        assert torch.equal(getattr(module, name), stored), name
    assert torch.equal(module.matrix, lhead.matrix) and module.lam == lhead.lam and module.grid == (4, 5)
    for fused in (True, False):
        module.use_fused = fused
        assert _rel(module(maps), want) < 1e-10
    if precision == "fp16":  # float16 values fit a float32 head exactly
        f32 = lhead.head(dtype=torch.float32)
        assert torch.equal(f32.vectors.double(), lhead.vectors) and torch.equal(f32.inner.double(), lhead.inner)
    with pytest.raises(ValueError, match="no detector metadata: pass embedding= and target_dim="):
        LocalDeployHead.from_scorer(scorer, precision, grid=(4, 5)).head()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_onnx_head_only_from_local_head_file(map_head, tmp_path, precision):
    scorer, info = map_head
    path = tmp_path / "local.crdh"
    LocalDeployHead.from_scorer(scorer, "fp16" if precision == "fp16" else "fp64", rank=3, detector=info).save(path)
    lhead = LocalDeployHead.load(path)
    result = export_onnx(path, tmp_path / "local.onnx", head_only=True, precision=precision)
    meta = result.metadata
    assert meta["spatial"] == "local" and meta["local_rank"] == 3 and meta["rank"] is None
    assert meta["head_matrix_precision"] == lhead.precision and meta["lam"] == lhead.lam
    maps = _maps(2, 3, torch.float32)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    scores, patch_maps = session.run(None, {n: m.numpy() for n, m in zip(info["layers"], maps)})
    want = lhead.score(_map_grids(maps), torch.float64).reshape(3, 4, 5).numpy()
    tol = 1e-4 if precision == "fp32" else 1e-2
    assert np.abs(patch_maps - want).max() / np.abs(want).max() < tol
    assert np.abs(scores - want.reshape(3, -1).max(1)).max() / np.abs(want).max() < tol
    with pytest.raises(ValueError, match="a local head file has no such form"):
        export_onnx(path, tmp_path / "r.onnx", head_only=True, rank=2)
    bare = tmp_path / "bare.crdh"
    LocalDeployHead.from_scorer(scorer, grid=(4, 5)).save(bare)
    with pytest.raises(Exception, match="no detector metadata"):
        export_onnx(bare, tmp_path / "bare.onnx", head_only=True)


@pytest.fixture(scope="module")
def local_detector_file(tmp_path_factory):
    """A fitted detector that scores position-aware (``spatial="local"``), saved as a detector model file."""
    from deploy_fixtures import CROP, demo_images

    from crd_fast.detector.detector import CRDDetector

    det = CRDDetector(
        backbone="resnet18", weights="random", resize=CROP, crop=CROP, batch_size=4,
        lam_rel=0.05, spatial="local", local_rank=4,
    )  # fmt: skip
    det.fit(demo_images(8), progress=False)
    det.set_threshold(1.0)
    path = tmp_path_factory.mktemp("local_det") / "local.crd"
    det.save(path)
    return det, path


def test_head_file_of_a_local_detector_exports_like_the_detector(local_detector_file, tmp_path):
    from deploy_fixtures import demo_images

    detector, path = local_detector_file
    with pytest.raises(ValueError, match="no such form: pass local_rank="):
        make_head_file(path, tmp_path / "x.crdh", rank=8)
    full = make_head_file(path, tmp_path / "local.crdh", precision="fp64")  # from the detector file
    assert isinstance(full, LocalDeployHead) and full.grid == tuple(detector.patch_grid) and full.rank == 4
    assert full.detector["lam_rel"] == detector.lam_rel == full.lam_rel and full.detector["threshold"] == 1.0
    x = torch.cat([batch for _, batch in detector.iter_batches(demo_images(2) + demo_images(2, defect=True))])
    with torch.no_grad():
        want = [t.double().numpy() for t in detector.inference_model()(x)]
    result = export_onnx(tmp_path / "local.crdh", tmp_path / "local.onnx")
    assert result.metadata["spatial"] == "local" and result.metadata["threshold"] == 1.0
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    for got, w in zip(session.run(None, {"images": x.numpy()}), want):
        assert np.abs(got - w).max() / np.abs(w).max() < 1e-4

    # fp16 storage, 3 of the 4 per-position directions: the ONNX graph computes the head file's own scores
    small = make_head_file(detector, tmp_path / "local16.crdh", precision="fp16", local_rank=3)
    assert small.rank == 3 and small.model_rank == 4
    emb = detector.embed(x).double()
    b, d, h, w = emb.shape
    grids = patch_matrix(emb).reshape(b, h * w, d)
    result = export_onnx(tmp_path / "local16.crdh", tmp_path / "local16.onnx")
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    image_scores, _, patch_maps = session.run(None, {"images": x.numpy()})
    want = small.score(grids, torch.float64).reshape(patch_maps.shape).numpy()
    assert np.abs(patch_maps - want).max() / np.abs(want).max() < 1e-4
    assert np.abs(image_scores - want.reshape(b, -1).max(1)).max() / np.abs(want).max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_on_cuda_grids_matches_cpu(train, test_grids):
    head = LocalDeployHead.from_scorer(_scorer(train), "fp16")
    got = head.score(test_grids.cuda(), torch.float64)
    assert got.device.type == "cuda"
    assert _rel(got.cpu(), head.score(test_grids, torch.float64)) < 1e-12
