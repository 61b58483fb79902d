"""int8 export with the head refitted on the int8 backbone's features (crd_fast.deploy.quantize, refit_head=True).

The reference is independent of the refit code: the int8 graph's feature maps are read here by their tensor
names (the DequantizeLinear outputs of each layer's last activation), the CRD is fitted on them in float64 by
dense solves, and its patch scores must equal the exported graph's patch maps (float32 head: rtol 1e-3 of the
largest score). Tiny resnet18 with random weights at 64 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import onnxruntime as ort  # noqa: E402
from deploy_fixtures import CROP, demo_images, fitted_detector  # noqa: E402
from helpers import dense_local_scores  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from crd_fast.core.embedding import embed_patches, patch_grids, patch_matrix  # noqa: E402
from crd_fast.deploy import OnnxDetector, export_onnx  # noqa: E402
from crd_fast.deploy.quantize import BACKBONE_SCOPE, export_onnx_int8  # noqa: E402
from crd_fast.detector.detector import CRDDetector, score_statistics  # noqa: E402

QDQ = ("QuantizeLinear", "DequantizeLinear")


def _layer_features(onnx_path, det, images) -> tuple[list[torch.Tensor], np.ndarray]:
    """The int8 graph's feature maps of ``images`` as the head reads them (one per layer), and its patch maps."""
    model = onnx.load(str(onnx_path))
    names = []
    for layer in det.layers:
        found = {
            n.output[0]
            for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.name.startswith(f"{BACKBONE_SCOPE}{layer}/")
        }
        consumers = {i for n in model.graph.node if not n.name.startswith(BACKBONE_SCOPE) for i in n.input}
        (name,) = found & consumers  # the one dequantized tensor of this layer that leaves the backbone
        names.append(name)
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.cat([b for _, b in det.iter_batches(images)]).numpy()
    out = session.run(["patch_maps", *names], {"images": x})
    return [torch.from_numpy(f) for f in out[1:]], out[0]


def _global_reference(train: torch.Tensor, test: torch.Tensor, lam_rel: float) -> torch.Tensor:
    """lam ||(C + lam I)^-1 (y - mu)|| in float64, C the population covariance, lam = lam_rel trace(C) / d."""
    train, test = train.double(), test.double()
    mu = train.mean(0)
    cov = (train - mu).T @ (train - mu) / train.shape[0]
    d = cov.shape[0]
    lam = lam_rel * float(torch.trace(cov)) / d
    z = torch.linalg.solve(cov + lam * torch.eye(d, dtype=torch.float64), (test - mu).T).T
    return lam * torch.linalg.vector_norm(z, dim=1)


@pytest.fixture(scope="module")
def refitted(tmp_path_factory):
    det = fitted_detector("concat")
    d = tmp_path_factory.mktemp("int8r")
    train = demo_images(6)
    refit = export_onnx_int8(det, d / "r.onnx", train, calibration_images=4)
    plain = export_onnx_int8(det, d / "p.onnx", train, calibration_images=4, refit_head=False)
    return det, train, refit, plain


def test_refitted_head_equals_float64_fit_of_the_int8_features(refitted):
    det, train, refit, _ = refitted
    test = demo_images(2) + demo_images(2, defect=True)
    train_maps, _ = _layer_features(refit.onnx_path, det, train)
    test_maps, patch_maps = _layer_features(refit.onnx_path, det, test)
    expected = _global_reference(
        patch_matrix(embed_patches(train_maps, det.embedding, det.target_dim)),
        patch_matrix(embed_patches(test_maps, det.embedding, det.target_dim)),
        det.lam_rel,
    ).reshape(patch_maps.shape)
    got = torch.from_numpy(patch_maps).double()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.max()))
    q = refit.metadata["quantization"]
    assert q["refit_images"] == 6 and q["calibration_images"] == 4 and "refitted" in q["head"]
    assert refit.metadata["n_images"] == 6


def test_refit_changes_only_the_head(refitted):
    _, _, refit, plain = refitted
    a, b = onnx.load(str(refit.onnx_path)).graph, onnx.load(str(plain.onnx_path)).graph

    def backbone_inits(graph):
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        used = {i for n in graph.node if n.name.startswith(BACKBONE_SCOPE) or n.op_type in QDQ for i in n.input}
        return {k: v for k, v in inits.items() if k in used}

    ia, ib = backbone_inits(a), backbone_inits(b)
    assert ia.keys() == ib.keys() and len(ia) > 10
    for k in ia:
        np.testing.assert_array_equal(ia[k], ib[k], err_msg=k)
    # the head's initializers do differ (a refit of other features), and the float head says where it came from
    ha = {i.name: numpy_helper.to_array(i) for i in a.initializer if i.name not in ia}
    hb = {i.name: numpy_helper.to_array(i) for i in b.initializer if i.name not in ib}
    assert any(not np.array_equal(ha[k], hb[k]) for k in ha.keys() & hb.keys() if ha[k].size > 100)
    assert plain.metadata["quantization"]["refit_images"] == 0
    assert "float32" in plain.metadata["quantization"]["head"]


def test_train_score_stats_are_the_int8_graphs(refitted):
    det, train, refit, _ = refitted
    x = torch.cat([b for _, b in det.iter_batches(train)])  # 6 images < the 32 the sample keeps: all of them
    scores = OnnxDetector(refit.onnx_path).run(x.numpy())[0]
    want = score_statistics(scores.astype(np.float64))
    got = refit.metadata["train_score_stats"]
    assert got.keys() == want.keys() and got["n"] == 6
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5)


def test_local_head_refit_equals_dense_float64_fit(tmp_path):
    det = CRDDetector(
        backbone="resnet18",
        weights="random",
        resize=CROP,
        crop=CROP,
        layers=("layer2",),
        spatial="local",
        lam_rel=0.01,
        local_rank=4,
        batch_size=4,
    )
    train = demo_images(6)
    det.fit(train, progress=False)
    refit = export_onnx_int8(det, tmp_path / "l.onnx", train, calibration_images=3)
    test = demo_images(2) + demo_images(1, defect=True)
    train_maps, _ = _layer_features(refit.onnx_path, det, train)
    test_maps, patch_maps = _layer_features(refit.onnx_path, det, test)
    ls = det.model.scorer
    expected = dense_local_scores(
        patch_grids(embed_patches(train_maps, det.embedding, det.target_dim)),
        patch_grids(embed_patches(test_maps, det.embedding, det.target_dim)),
        ls.shrinkage,
        ls.rank,
        ls.lam_rel,
    ).reshape(patch_maps.shape)
    got = torch.from_numpy(patch_maps).double()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.max()))
    assert refit.metadata["quantization"]["refit_images"] == 6


def test_refit_bad_input_and_atomic_write(refitted, tmp_path):
    det, _, _, _ = refitted
    target = tmp_path / "m.onnx"
    target.write_bytes(b"earlier export")
    with pytest.raises(TypeError, match="refit_head must be True or False"):
        export_onnx_int8(det, target, demo_images(2), refit_head="yes")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        export_onnx_int8(det, target, empty)
    # a bad image after the first calibration_images: the ranges are calibrated, the refit reads it and fails
    with pytest.raises(ValueError, match="image 4"):
        export_onnx_int8(det, target, demo_images(4) + [np.zeros(5)], calibration_images=4)
    assert target.read_bytes() == b"earlier export" and not (tmp_path / "m.onnx.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m.onnx"]  # no temporary left behind
    with pytest.raises(ValueError, match="training score statistics must be a dict of numbers"):
        det.set_train_score_stats({"n": "six"})


def test_refit_from_model_file_leaves_it_unchanged(refitted, tmp_path):
    det, train, _, _ = refitted
    model = tmp_path / "m.crd"
    det.save(model)
    before = model.read_bytes()
    out = export_onnx_int8(model, tmp_path / "m.onnx", train[:3], calibration_images=2)
    assert model.read_bytes() == before
    assert out.metadata["source"] == str(model) and out.metadata["quantization"]["refit_images"] == 3


def _stem(graph):
    return next(n for n in graph.node if n.op_type == "Conv" and n.name.startswith(BACKBONE_SCOPE))


def test_float_stem_keeps_the_first_convolution_float(refitted, tmp_path):
    det, train, refit, _ = refitted
    graph = onnx.load(str(refit.onnx_path)).graph
    stem = _stem(graph)
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert stem.input[0] == "images" and stem.input[1] not in produced_by_dq
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    fp32 = onnx.load(str(export_onnx(det, tmp_path / "f.onnx").onnx_path)).graph
    fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.initializer}
    np.testing.assert_array_equal(inits[stem.input[1]], fp32_inits[_stem(fp32).input[1]])  # float32, unrounded
    assert refit.metadata["quantization"]["float_backbone_nodes"] == [stem.name]
    # the next convolution is quantized (weights through a DequantizeLinear)
    assert any(n.op_type == "Conv" and n.input[1] in produced_by_dq for n in graph.node)
    quantized = export_onnx_int8(det, tmp_path / "q.onnx", train[:2], calibration_images=2, float_stem=False)
    graph = onnx.load(str(quantized.onnx_path)).graph
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    stem = _stem(graph)
    assert stem.input[0] in produced_by_dq and stem.input[1] in produced_by_dq
    assert quantized.metadata["quantization"]["float_backbone_nodes"] == []
    with pytest.raises(TypeError, match="float_stem must be True or False"):
        export_onnx_int8(det, tmp_path / "x.onnx", train[:2], float_stem=1)
