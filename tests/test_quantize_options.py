"""Options of the int8 export (crd_fast.deploy.quantize): calibration method, weight granularity, symmetric
activations, extra float nodes, and calibration sets whose last batch is smaller than the others.

The activation ranges are read back from the exported graph (the scale and zero point of the QuantizeLinear on
each tensor) and checked against what each method must give: MinMax's uint8 scale of a ReLU output is its
largest value over the calibration images / 255 (computed here in torch); the percentile range lies inside
the MinMax range, the entropy ranges differ; per-tensor weights have one scale, per-channel weights one per
output channel.
Tiny resnet18 with random weights at 64 px, batch size 4: 6 calibration images are batches of 4 and 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from deploy_fixtures import demo_images, fitted_detector  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from crd_fast.deploy import OnnxDetector  # noqa: E402
from crd_fast.deploy.metadata import DeployError  # noqa: E402
from crd_fast.deploy.quantize import BACKBONE_SCOPE, export_onnx_int8  # noqa: E402

N_CALIBRATION = 6  # batch size 4: the last batch holds 2


def _activation_ranges(graph) -> dict[str, tuple[float, int]]:
    """Tensor name -> (scale, zero point) of every QuantizeLinear on an activation (not an initializer)."""
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = {}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            out[n.input[0]] = (float(inits[n.input[1]]), int(inits[n.input[2]]))
    return out


def _weight_scales(graph) -> dict[str, np.ndarray]:
    """Weight initializer name -> its DequantizeLinear scale (int8 weights are stored quantized)."""
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {
        n.input[0]: inits[n.input[1]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
    }


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    det = fitted_detector("concat")
    d = tmp_path_factory.mktemp("int8o")
    train = demo_images(N_CALIBRATION)
    kw = {"calibration_images": N_CALIBRATION, "refit_head": False}
    out = {
        "minmax": export_onnx_int8(det, d / "mm.onnx", train, calibration_method="minmax", **kw),
        "percentile": export_onnx_int8(det, d / "pc.onnx", train, **kw),  # the default
        "entropy": export_onnx_int8(det, d / "en.onnx", train, calibration_method="entropy", **kw),
    }
    return det, train, out


def test_minmax_scale_of_the_last_feature_map_is_its_largest_value(exports):
    det, train, out = exports
    graph = onnx.load(str(out["minmax"].onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    head_reads = {i for n in graph.node if not n.name.startswith(BACKBONE_SCOPE) for i in n.input}
    # layer3's output as the head reads it: the one DequantizeLinear of layer3 whose output leaves the backbone
    (dq,) = [
        n
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.name.startswith(f"{BACKBONE_SCOPE}layer3/")
        and n.output[0] in head_reads
    ]
    scale, zero = float(inits[dq.input[1]]), int(inits[dq.input[2]])
    x = torch.cat([b for _, b in det.iter_batches(train)])
    with torch.inference_mode():
        largest = float(det.extract_features(x)[-1].max())  # layer3's output over all 6 images (4 + 2)
    assert zero == 0 and scale == pytest.approx(largest / 255.0, rel=1e-4)
    assert out["minmax"].metadata["quantization"]["method"] == "MinMax"
    assert out["minmax"].metadata["quantization"]["calibration_images"] == N_CALIBRATION


def test_histogram_calibrations_run_and_set_their_own_ranges(exports):
    _, _, out = exports
    minmax = _activation_ranges(onnx.load(str(out["minmax"].onnx_path)).graph)
    for method, name in (("percentile", "Percentile"), ("entropy", "Entropy")):
        assert out[method].metadata["quantization"]["method"] == name
    ranges = {m: _activation_ranges(onnx.load(str(out[m].onnx_path)).graph) for m in ("percentile", "entropy")}
    assert ranges["percentile"].keys() == ranges["entropy"].keys() == minmax.keys()
    # the percentile range is clipped to the observed [min, max]: never wider than MinMax's (with 6 small images
    # the 99.999th percentile is about the largest value); entropy (KL) thresholds move the ranges
    assert all(ranges["percentile"][k][0] <= minmax[k][0] * (1 + 1e-6) for k in minmax)
    assert sum(ranges["entropy"][k][0] != pytest.approx(minmax[k][0], rel=1e-2) for k in minmax) > 0
    images = demo_images(2) + demo_images(2, defect=True)
    for method in ("percentile", "entropy"):
        result = OnnxDetector(out[method].onnx_path).predict(images)
        assert np.isfinite(result.image_scores).all()


def test_per_tensor_weights_and_symmetric_activations(exports, tmp_path):
    det, train, out = exports
    per_channel = _weight_scales(onnx.load(str(out["minmax"].onnx_path)).graph)
    assert per_channel and any(s.size > 1 for s in per_channel.values())
    r = export_onnx_int8(
        det,
        tmp_path / "t.onnx",
        train[:4],
        calibration_images=4,
        refit_head=False,
        per_channel=False,
        symmetric_activations=True,
    )
    graph = onnx.load(str(r.onnx_path)).graph
    per_tensor = _weight_scales(graph)
    assert per_tensor.keys() == per_channel.keys() and all(s.size == 1 for s in per_tensor.values())
    assert {z for _, z in _activation_ranges(graph).values()} == {128}  # uint8 range centred on 0
    q = r.metadata["quantization"]
    assert q["weights"] == "int8 per tensor" and q["activations"] == "uint8 symmetric"


def test_float_nodes_stay_float(exports, tmp_path):
    det, train, out = exports
    graph = onnx.load(str(out["minmax"].onnx_path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name.startswith(f"{BACKBONE_SCOPE}layer3/")]
    keep = convs[-1].name
    r = export_onnx_int8(det, tmp_path / "f.onnx", train[:4], calibration_images=4, float_nodes=[keep])
    graph = onnx.load(str(r.onnx_path)).graph
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    node = next(n for n in graph.node if n.name == keep)
    assert node.input[1] not in produced_by_dq  # float32 weights
    assert any(n.op_type == "Conv" and n.input[1] in produced_by_dq for n in graph.node)  # others quantized
    assert r.metadata["quantization"]["float_backbone_nodes"][1:] == [keep]


def test_option_errors(exports, tmp_path):
    det, train, _ = exports
    target = tmp_path / "x.onnx"
    with pytest.raises(ValueError, match="calibration_method must be one of"):
        export_onnx_int8(det, target, train[:2], calibration_method="kl")
    with pytest.raises(TypeError, match="per_channel must be True or False"):
        export_onnx_int8(det, target, train[:2], per_channel=1)
    with pytest.raises(TypeError, match="symmetric_activations must be True or False"):
        export_onnx_int8(det, target, train[:2], symmetric_activations="yes")
    with pytest.raises(TypeError, match="float_nodes must be a sequence of node names"):
        export_onnx_int8(det, target, train[:2], float_nodes="/extractor/layer3/Conv")
    with pytest.raises(DeployError, match="float_nodes names no backbone node"):
        export_onnx_int8(det, target, train[:2], calibration_images=2, float_nodes=["/head/Conv"])
    assert not target.exists()


def test_histogram_calibration_writes_nothing_to_stdout(exports, tmp_path, capsys):
    det, train, _ = exports
    capsys.readouterr()
    export_onnx_int8(det, tmp_path / "quiet.onnx", train, calibration_images=N_CALIBRATION, refit_head=False)
    assert capsys.readouterr().out == ""  # onnxruntime's progress prints go to the debug log
