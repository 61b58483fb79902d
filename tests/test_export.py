"""ONNX export: the exported graph reproduces the eager torch model and the float64 reference.

Tolerances (relative to the largest value of the compared output): 1e-4 for float32 exports (measured
about 2e-6), 1e-2 for float16 head weights (measured about 2e-3).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from deploy_fixtures import CROP, fitted_detector

from crd_fast.deploy import (
    DeployError,
    OnnxDetector,
    check_default_domain,
    export_onnx,
    make_head_file,
    variant_projection,
)
from crd_fast.ops import reference

FP32_RTOL = 1e-4
FP16_RTOL = 1e-2


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=["concat", "patchcore"])
def detector(request):
    return fitted_detector(request.param)


@pytest.fixture(scope="module")
def whole(detector, tmp_path_factory):
    # exported from a model file written by CRDDetector.save (the CLI's path)
    folder = tmp_path_factory.mktemp("onnx")
    detector.save(folder / "model.crd")
    return export_onnx(folder / "model.crd", folder / "model.onnx")


@pytest.fixture(scope="module")
def head_only(detector, tmp_path_factory):
    return export_onnx(detector, tmp_path_factory.mktemp("onnx") / "head.onnx", head_only=True)


def session(result) -> ort.InferenceSession:
    return ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])


def test_whole_detector_matches_eager_torch(detector, whole, rng):
    # batch 3: the export was traced with batch 2, so this also checks the dynamic batch axis
    x = torch.from_numpy(rng.standard_normal((3, 3, CROP, CROP)).astype(np.float32))
    got = session(whole).run(None, {"images": x.numpy()})
    with torch.inference_mode():
        want = [t.numpy() for t in detector.inference_model()(x)]
    for name, g, w in zip(("image_scores", "anomaly_maps", "patch_maps"), got, want):
        assert g.shape == w.shape, name
        assert rel_err(g, w) < FP32_RTOL, name


def test_head_only_matches_float64_reference(detector, head_only, rng):
    shapes = head_only.metadata["feature_shapes"]
    maps = [rng.standard_normal((3, *s)).astype(np.float32) for s in shapes]
    scores, patch_maps = session(head_only).run(None, dict(zip(detector.layers, maps)))
    proj = detector.model.scorer.projection
    want = reference.crd_head(
        [torch.from_numpy(m) for m in maps], proj.matrix, proj.offset, detector.embedding, detector.target_dim
    ).numpy()
    assert patch_maps.shape == (3, *head_only.metadata["patch_grid"])
    assert rel_err(patch_maps, want) < FP32_RTOL
    assert rel_err(scores, want.reshape(3, -1).max(1)) < FP32_RTOL


def test_graph_is_standard_onnx_with_dynamic_batch(detector, whole, head_only):
    for result, inputs in ((whole, ["images"]), (head_only, list(detector.layers))):
        model = onnx.load(str(result.onnx_path))
        onnx.checker.check_model(model)
        assert {n.domain for n in model.graph.node} <= {""}
        assert [i.name for i in model.graph.input] == inputs
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert model.opset_import[0].version == 17 == result.metadata["opset"]
        assert json.loads(dict((p.key, p.value) for p in model.metadata_props)["crd_fast"])["head_only"] == (
            inputs != ["images"]
        )
    assert (
        head_only.metadata["inputs"][0]["name"] == "layer2" and head_only.metadata["outputs"][1]["name"] == "patch_maps"
    )


def test_metadata_describes_the_detector(detector, whole):
    meta = json.loads(whole.metadata_path.read_text())
    assert meta["config"] == detector.config
    assert meta["threshold"] == detector.threshold
    assert meta["train_score_stats"] == detector.train_score_stats
    assert meta["layer_channels"] == detector.layer_channels and meta["crop"] == CROP
    assert meta["inputs"] == [{"name": "images", "shape": ["batch", 3, CROP, CROP], "dtype": "float32"}]
    import hashlib

    assert meta["onnx_sha256"] == hashlib.sha256(whole.onnx_path.read_bytes()).hexdigest()


def test_fp16_and_rank_variants(detector, tmp_path, rng):
    rank = detector.dim // 2
    half = export_onnx(detector, tmp_path / "half.onnx", head_only=True, precision="fp16")
    low = export_onnx(detector, tmp_path / "rank.onnx", head_only=True, rank=rank)
    model = onnx.load(str(half.onnx_path))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    maps = [rng.standard_normal((2, *s)).astype(np.float32) for s in half.metadata["feature_shapes"]]
    feeds = dict(zip(detector.layers, maps))
    tmaps = [torch.from_numpy(m) for m in maps]
    exact = reference.crd_head(
        tmaps,
        detector.model.scorer.projection.matrix,
        detector.model.scorer.projection.offset,
        detector.embedding,
        detector.target_dim,
    ).numpy()
    assert 0 < rel_err(session(half).run(None, feeds)[1], exact) < FP16_RTOL
    proj = variant_projection(detector.model.scorer, "fp64", rank)
    want = reference.crd_head(tmaps, proj.matrix, proj.offset, detector.embedding, detector.target_dim).numpy()
    assert rel_err(session(low).run(None, feeds)[1], want) < FP32_RTOL
    assert low.metadata["rank"] == rank and low.metadata["error_bound"] == pytest.approx(proj.error_bound)
    assert (
        half.onnx_path.stat().st_size
        < 0.7 * export_onnx(detector, tmp_path / "f.onnx", head_only=True).onnx_path.stat().st_size
    )


def test_export_from_model_file_runs(detector, whole):
    assert whole.metadata["source"].endswith("model.crd") and len(whole.metadata["source_sha256"]) == 64
    images = [np.random.default_rng(i).random((70, 90, 3)).astype(np.float32) for i in range(3)]
    want = detector.predict(images, progress=False)
    got = OnnxDetector(whole.onnx_path, embedding=detector.embedding).predict(images)
    assert rel_err(got.image_scores, want.image_scores) < FP32_RTOL


def test_export_from_fp16_head_file(tmp_path):
    # a float16 head file holds no backbone: whole-detector export rebuilds it from the stored config
    detector = fitted_detector("concat")
    make_head_file(detector, tmp_path / "head16.crdh", precision="fp16")
    from_head = export_onnx(tmp_path / "head16.crdh", tmp_path / "head16.onnx")
    assert (
        from_head.metadata["head_matrix_precision"] == "fp16" and from_head.metadata["threshold"] == detector.threshold
    )
    images = [np.random.default_rng(i).random((70, 90, 3)).astype(np.float32) for i in range(3)]
    got = OnnxDetector(from_head.onnx_path).predict(images).image_scores
    assert 0 < rel_err(got, detector.predict(images, progress=False).image_scores) < FP16_RTOL


def test_bad_arguments_and_custom_ops(tmp_path):
    detector = fitted_detector("concat")
    with pytest.raises(ValueError, match="precision"):
        export_onnx(detector, tmp_path / "x.onnx", precision="int8")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(detector, tmp_path / "x.onnx", opset=7)
    with pytest.raises(ValueError, match="rank"):
        export_onnx(detector, tmp_path / "x.onnx", rank=0)
    with pytest.raises(TypeError, match="source"):
        export_onnx(42, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    node = onnx.helper.make_node("FusedMatMul", ["a", "b"], ["c"], domain="com.microsoft")
    graph = onnx.helper.make_graph([node], "g", [], [])
    with pytest.raises(DeployError, match="custom operators.*com.microsoft::FusedMatMul"):
        check_default_domain(onnx.helper.make_model(graph))


def test_unfitted_detector_is_refused(tmp_path):
    from crd_fast.detector.detector import CRDDetector

    det = CRDDetector(backbone="resnet18", weights="random", resize=CROP, crop=CROP)
    with pytest.raises(RuntimeError, match="not fitted"):
        export_onnx(det, tmp_path / "x.onnx")
