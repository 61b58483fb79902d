"""LocalCRDHead and crd_fast::crd_residual against float64 direct computations; input errors; ONNX export.

Tolerances, relative to the largest expected score: 1e-10 for float64 maps through a float64 head (both paths),
1e-5 for float32 maps through the default float32 head (measured about 1e-7), 1e-4 for ONNX against eager torch
in float32, 1e-2 for float16 head weights.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from helpers import dense_local_scores
from torch._subclasses.fake_tensor import FakeTensorMode

from crd_fast.core.embedding import embed_patches, patch_matrix
from crd_fast.core.local import LocalCRDModel, local_eigenpairs_from_patches
from crd_fast.models.local_head import LocalCRDHead
from crd_fast.ops import cpu, crd_residual, reference

SPECS = {1: ((6, 6, 5),), 2: ((6, 6, 5), (5, 3, 3))}  # (C, H, W) per layer; the 6x5 grid is not square
TARGET_DIM = 8
N_TRAIN = 10


def _maps(seed, n, specs, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # per-position structure, as aligned parts have: a fixed pattern plus noise
    return [
        3 * torch.randn(1, c, h, w, generator=g, dtype=dtype) + torch.randn(n, c, h, w, generator=g, dtype=dtype)
        for c, h, w in specs
    ]


def _grids(maps, embedding):
    emb = embed_patches([m.double() for m in maps], embedding, TARGET_DIM)
    b, d, h, w = emb.shape
    return patch_matrix(emb).reshape(b, h * w, d)


def _fit(train_maps, embedding, k, a):
    grids = _grids(train_maps, embedding)
    n, p, d = grids.shape
    means, vals, vecs = local_eigenpairs_from_patches(grids, k)
    xc = grids - means
    pooled = torch.einsum("npd,npe->de", xc, xc) / (n * p)
    return LocalCRDModel.build(means, pooled, vals, vecs, a), grids


def _head(model, embedding, layers, fused, dtype=torch.float64, lam_rel=0.05):
    channels = [c for c, _, _ in SPECS[layers]]
    return LocalCRDHead.from_model(
        model, lam_rel, embedding, TARGET_DIM, channels, use_fused=fused, grid=SPECS[layers][0][1:], dtype=dtype
    )


def _assert_rel(got, want, rtol):
    err = float((got.double() - want).abs().max()) / float(want.abs().max())
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("embedding", ["concat", "patchcore"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("a", [0.0, 1.0])
def test_float64_head_equals_direct_computation(embedding, layers, k, a):
    seed = 1000 * (embedding == "patchcore") + 100 * layers + 10 * k + int(a)
    train, test = _maps(seed, N_TRAIN, SPECS[layers]), _maps(seed + 1, 3, SPECS[layers])
    model, train_grids = _fit(train, embedding, k, a)
    test_grids = _grids(test, embedding)
    h, w = SPECS[layers][0][1:]
    want = dense_local_scores(train_grids, test_grids, a, k, 0.05).reshape(3, h, w)
    _assert_rel(model.scores(test_grids, 0.05).reshape(3, h, w), want, 1e-10)
    for fused in (False, True):
        head = _head(model, embedding, layers, fused)
        got = head(test)
        assert got.dtype == torch.float64 and got.shape == (3, h, w)
        _assert_rel(got, want, 1e-10)
    # float32 maps through the default float32 head: float32 scores
    for fused in (False, True):
        got = _head(model, embedding, layers, fused, dtype=torch.float32)([m.float() for m in test])
        assert got.dtype == torch.float32
        _assert_rel(got, want, 1e-5)


def test_fused_path_takes_the_compiled_residual_pass(monkeypatch):
    assert cpu.residual_available(), f"the compiled residual pass is missing: {cpu.import_error()}"
    calls = []
    real = cpu.fused_residual_cpu
    monkeypatch.setattr(cpu, "fused_residual_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    train, test = _maps(7, N_TRAIN, SPECS[2]), _maps(8, 2, SPECS[2])
    model, _ = _fit(train, "concat", 3, 0.5)
    torch.testing.assert_close(_head(model, "concat", 2, True)(test), _head(model, "concat", 2, False)(test))
    assert calls, "the eager CPU path did not call the fused residual pass"


def test_eager_cuda_maps_take_the_fused_residual_op(monkeypatch):
    """On CUDA (faked: only the device is read before the path is chosen) eager calls take the fused op, whose CUDA
    kernel is crd_residual_tile_* (tests/test_native.py runs it on a GPU); use_fused=False and other devices don't."""
    train = _maps(31, N_TRAIN, SPECS[2])
    model, _ = _fit(train, "concat", 2, 0.5)
    with FakeTensorMode():
        on_cuda = [torch.empty(2, c, h, w, device="cuda") for c, h, w in SPECS[2]]
    on_meta = [torch.empty(2, c, h, w, device="meta") for c, h, w in SPECS[2]]
    for fused, maps, want in ((True, on_cuda, "fused"), (False, on_cuda, "torch"), (True, on_meta, "torch")):
        head = _head(model, "concat", 2, fused, dtype=torch.float32)
        calls = []
        monkeypatch.setattr(head, "fused_forward", lambda maps: calls.append("fused") or torch.ones(2, 6, 5))
        monkeypatch.setattr(head, "torch_forward", lambda maps: calls.append("torch") or torch.ones(2, 6, 5))
        head(maps)
        assert calls == [want], (fused, maps[0].device, calls)


def test_concat_head_without_layer_channels_and_state_dict_round_trip():
    train, test = _maps(21, N_TRAIN, SPECS[2]), _maps(22, 2, SPECS[2])
    model, _ = _fit(train, "concat", 3, 0.5)
    other, _ = _fit(_maps(23, N_TRAIN, SPECS[2]), "concat", 3, 0.5)
    want = _head(model, "concat", 2, False)(test)
    for fused in (False, True):
        bare = LocalCRDHead.from_model(model, 0.05, grid=(6, 5), use_fused=fused, dtype=torch.float64)
        torch.testing.assert_close(bare(test), want, rtol=1e-12, atol=0)
        # a head built from another model takes this one's state: both paths then score as this model
        loaded = LocalCRDHead.from_model(other, 0.05, grid=(6, 5), use_fused=fused, dtype=torch.float64)
        loaded.load_state_dict(bare.state_dict())
        torch.testing.assert_close(loaded(test), want, rtol=1e-12, atol=0)
        torch.testing.assert_close(copy.deepcopy(loaded)(test), want, rtol=1e-12, atol=0)


def test_head_buffers_are_the_documented_operands():
    train = _maps(9, N_TRAIN, SPECS[2])
    model, _ = _fit(train, "concat", 3, 0.5)
    head = _head(model, "concat", 2, False, dtype=torch.float32)
    lam = model.lam(0.05)
    f = model.factors(lam)
    matrix = lam * f.inv_b[:, None] * model.eigenvectors.T
    h, w = SPECS[2][0][1:]
    assert head.matrix.dtype == torch.float32 and head.offsets.shape == (model.dim, h, w)
    torch.testing.assert_close(head.matrix.double(), matrix, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        head.offsets.double(), (model.means @ matrix.T).T.reshape(-1, h, w), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(head.vectors.double(), model.scaled_vectors, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head.inner.double(), f.k, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head.inv_b.double(), f.inv_b, rtol=1e-6, atol=0)
    assert head.lam == pytest.approx(lam) and head.rank == 3 and head.positions == h * w
    assert set(head.state_dict()) == {"matrix", "folded", "offsets", "vectors", "inner", "inv_b"}


@pytest.mark.parametrize("embedding", ["concat", "patchcore"])
def test_residual_op_equals_reference(embedding):
    maps = _maps(11, 3, SPECS[2])
    d = 11 if embedding == "concat" else TARGET_DIM
    g = torch.Generator().manual_seed(12)
    matrix = torch.randn(5, d, generator=g, dtype=torch.float64)
    q = torch.randn(30, 5, generator=g, dtype=torch.float64)
    want = reference.crd_residual(maps, matrix, q, embedding, TARGET_DIM)
    rows = patch_matrix(embed_patches(maps, embedding, TARGET_DIM)) @ matrix.T
    torch.testing.assert_close(want, (rows.reshape(3, 30, 5) - q).reshape(3, 6, 5, 5), rtol=1e-12, atol=1e-12)
    got = crd_residual(maps, matrix, q, embedding, TARGET_DIM)
    assert got.shape == (3, 6, 5, 5) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got32 = crd_residual([m.float() for m in maps], matrix, q, embedding, TARGET_DIM)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_residual_op_checks_fake_and_compile():
    maps = _maps(13, 2, SPECS[2])
    g = torch.Generator().manual_seed(14)
    matrix, q = (
        torch.randn(4, 11, generator=g, dtype=torch.float64),
        torch.randn(30, 4, generator=g, dtype=torch.float64),
    )
    torch.library.opcheck(torch.ops.crd_fast.crd_residual.default, (maps, matrix, q, "concat", 1024))
    with pytest.raises(ValueError, match=r"q must be \(P, r\) = \(30, 4\): one offset per position of the 6x5 grid"):
        crd_residual(maps, matrix, q[:29], "concat")
    with pytest.raises(ValueError, match="matrix must be"):
        crd_residual(maps, matrix[:, :10], q, "concat")
    with FakeTensorMode():
        fake = [torch.empty(2, 6, 28, 28, device="cuda"), torch.empty(2, 5, 14, 14, device="cuda")]
        out = torch.ops.crd_fast.crd_residual(
            fake, torch.empty(4, 11, device="cuda"), torch.empty(784, 4, device="cuda"), "concat", 1024
        )
        assert out.shape == (2, 28, 28, 4) and out.dtype == torch.float32 and out.device.type == "cuda"

    def norms(a, b, m, qq):
        return crd_residual([a, b], m, qq).square().sum(-1)

    compiled = torch.compile(norms, backend="aot_eager", fullgraph=True)
    maps32 = [m.float() for m in maps]
    torch.testing.assert_close(compiled(*maps32, matrix.float(), q.float()), norms(*maps32, matrix.float(), q.float()))


def test_bad_inputs_raise_clear_errors():
    train = _maps(15, N_TRAIN, SPECS[2])
    model, _ = _fit(train, "concat", 2, 0.5)
    for fused in (False, True):
        head = _head(model, "concat", 2, fused)
        with pytest.raises(ValueError, match=r"6x6 patch grid \(36 positions\); the local head was fitted on a 6x5"):
            head(_maps(16, 2, ((6, 6, 6), (5, 3, 3))))
        with pytest.raises(ValueError, match=r"feature maps have \[6, 4\] channels, the head was built for \[6, 5\]"):
            head(_maps(16, 2, ((6, 6, 5), (4, 3, 3))))
        bad = _maps(17, 2, SPECS[2])
        bad[1][1, 2, 1, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN or infinite scores: the feature maps hold NaN or infinity"):
            head(bad)
        with pytest.raises(ValueError, match="at least one feature map"):
            head([])
    with pytest.raises(ValueError, match="not a square grid: pass grid"):
        LocalCRDHead.from_model(model, 0.05)
    with pytest.raises(ValueError, match="grid 5x5 has 25 positions, the model has 30"):
        LocalCRDHead.from_model(model, 0.05, grid=(5, 5))
    with pytest.raises(ValueError, match="lam_rel must be positive"):
        LocalCRDHead.from_model(model, 0.0, grid=(6, 5))
    with pytest.raises(ValueError, match="needs layer_channels"):
        LocalCRDHead.from_model(model, 0.05, "patchcore", grid=(6, 5))
    broken = LocalCRDModel(
        model.means.clone().index_fill_(0, torch.tensor([3]), float("nan")),
        model.eigenvalues,
        model.eigenvectors,
        model.scaled_vectors,
        model.shrinkage,
    )
    with pytest.raises(ValueError, match="the local model's means holds NaN"):
        LocalCRDHead.from_model(broken, 0.05, grid=(6, 5))


def test_inference_model_runs_a_local_head():
    from crd_fast.features import FeatureExtractor
    from crd_fast.models import InferenceModel
    from crd_fast.models.anomaly_map import AnomalyMapper

    ext = FeatureExtractor("resnet18", ("layer2", "layer3"), "random", seed=3).eval()
    model, head = _backbone_model_and_head(ext)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    inference = InferenceModel(ext, head, AnomalyMapper(64)).eval()
    with torch.no_grad():
        scores, amaps, pmaps = inference(x)
        feats = ext(x)
    grids = _grids(feats, "concat")
    torch.testing.assert_close(pmaps.double(), model.scores(grids, 0.05).reshape(2, 8, 8), rtol=1e-4, atol=1e-6)
    assert amaps.shape == (2, 64, 64) and torch.equal(scores, pmaps.flatten(1).amax(1))


def _backbone_model_and_head(ext, k=4, a=0.5, fused=True):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        feats = ext(torch.randn(12, 3, 64, 64, generator=g))
    grids = _grids(feats, "concat")  # (12, 64, 384) on the 8x8 grid of layer2
    means, vals, vecs = local_eigenpairs_from_patches(grids, k)
    xc = grids - means
    pooled = torch.einsum("npd,npe->de", xc, xc) / (grids.shape[0] * grids.shape[1])
    model = LocalCRDModel.build(means, pooled, vals, vecs, a)
    channels = [int(f.shape[1]) for f in feats]
    return model, LocalCRDHead.from_model(model, 0.05, "concat", layer_channels=channels, use_fused=fused)


def test_onnx_export_of_backbone_and_local_head_matches_torch():
    import io

    import onnxruntime as ort

    from crd_fast.deploy import check_default_domain
    from crd_fast.deploy.export import HeadOnlyModel, WholeModel
    from crd_fast.features import FeatureExtractor
    from crd_fast.models.anomaly_map import AnomalyMapper

    ext = FeatureExtractor("resnet18", ("layer2", "layer3"), "random", seed=6).eval()
    _, head = _backbone_model_and_head(ext, fused=False)
    whole = WholeModel(ext, head, AnomalyMapper(64)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and trace-constant warnings
        torch.onnx.export(
            whole, (x,), buf, dynamo=False, opset_version=17, input_names=["images"],
            output_names=["image_scores", "anomaly_maps", "patch_maps"], dynamic_axes={"images": {0: "batch"}},
        )  # fmt: skip
    import onnx

    check_default_domain(onnx.load_from_string(buf.getvalue()))
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(8))  # another batch size
    got = sess.run(None, {"images": x3.numpy()})
    with torch.no_grad():
        want = whole(x3)
        fused = LocalCRDHead.from_model(_backbone_model_and_head(ext)[0], 0.05, layer_channels=[128, 256])(ext(x3))
    for g_, w_ in zip(got, want):
        _assert_rel(torch.from_numpy(g_), w_.double(), 1e-4)
    _assert_rel(torch.from_numpy(got[2]), fused.double(), 1e-4)  # eager fused path = exported torch path
    # head only, one input per layer
    with torch.no_grad():
        feats = ext(x3)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(HeadOnlyModel(head).eval(), tuple(feats), buf, dynamo=False, opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: f.detach().numpy() for i, f in zip(sess.get_inputs(), feats)})
    _assert_rel(torch.from_numpy(got[1]), head(feats).double(), 1e-4)


@pytest.fixture(scope="module")
def local_detector():
    """A fitted detector that scores position-aware (``spatial="local"``): its inference model's head is a
    LocalCRDHead of its own LocalCRDScorer."""
    from deploy_fixtures import CROP, demo_images

    from crd_fast.detector.detector import CRDDetector

    det = CRDDetector(
        backbone="resnet18", weights="random", resize=CROP, crop=CROP, batch_size=4,
        lam_rel=0.05, spatial="local", local_rank=4,
    )  # fmt: skip
    det.fit(demo_images(8), progress=False)
    assert det.spatial_choice == "local" and isinstance(det.inference_model().head, LocalCRDHead)
    return det


def test_export_onnx_of_a_local_detector(local_detector, tmp_path):
    import onnxruntime as ort

    from crd_fast.deploy import export_onnx, head_of

    head = head_of(local_detector)
    assert isinstance(head, LocalCRDHead) and not head.use_fused
    assert local_detector.inference_model().head.use_fused  # a copy: the detector's own head is untouched
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = [t.double() for t in local_detector.inference_model()(x)]
    whole = export_onnx(local_detector, tmp_path / "local.onnx")
    assert whole.metadata["spatial"] == "local" and whole.metadata["local_rank"] == 4
    assert whole.metadata["lam"] == pytest.approx(head.lam) and whole.metadata["rank"] is None
    sess = ort.InferenceSession(str(whole.onnx_path), providers=["CPUExecutionProvider"])
    for got, w in zip(sess.run(None, {"images": x.numpy()}), want):
        _assert_rel(torch.from_numpy(got), w, 1e-4)
    half = export_onnx(local_detector, tmp_path / "half.onnx", head_only=True, precision="fp16")
    full = export_onnx(local_detector, tmp_path / "full.onnx", head_only=True)
    assert half.onnx_path.stat().st_size < 0.75 * full.onnx_path.stat().st_size
    with torch.no_grad():
        feats = local_detector.extractor(x)
    sess = ort.InferenceSession(str(half.onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: f.detach().numpy() for i, f in zip(sess.get_inputs(), feats)})
    _assert_rel(torch.from_numpy(got[1]), want[2], 1e-2)
    with pytest.raises(
        ValueError, match=r"rank=8 makes a rank-r head of the global CRD; .* position-aware \(local\) head"
    ):
        export_onnx(local_detector, tmp_path / "r.onnx", rank=8)


def test_head_of_a_global_detector_is_the_crd_head():
    from deploy_fixtures import fitted_detector

    from crd_fast.deploy import head_of
    from crd_fast.models.head import CRDHead

    det = fitted_detector("concat")
    head = head_of(det)
    assert isinstance(head, CRDHead) and not head.use_fused
    assert head_of(det, rank=5).rank == 5
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        feats = det.extractor(x)
        np.testing.assert_allclose(head(feats).numpy(), det.inference_model().head(feats).numpy(), rtol=1e-4)
