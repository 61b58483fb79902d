"""int8 ONNX export (crd_fast.deploy.quantize): backbone quantized, head float32, run by OnnxDetector.

Tolerance: the int8 backbone moves image scores by a few percent of their size (8-bit activations,
MinMax ranges from the calibration images); INT8_SCORE_RTOL bounds it against the float32 export on
fresh demo images, and the test also checks the graph really is quantized (so the bound is not vacuous).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from deploy_fixtures import demo_images, fitted_detector  # noqa: E402

from crd_fast.cli.main import main  # noqa: E402
from crd_fast.deploy import OnnxDetector, export_onnx  # noqa: E402
from crd_fast.deploy.quantize import BACKBONE_SCOPE, export_onnx_int8  # noqa: E402

#: Largest |int8 - fp32| image score, relative to the largest fp32 score.
INT8_SCORE_RTOL = 0.1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    det = fitted_detector("concat")
    d = tmp_path_factory.mktemp("int8")
    int8 = export_onnx_int8(det, d / "m8.onnx", demo_images(6), calibration_images=4)
    fp32 = export_onnx(det, d / "m.onnx")
    return det, int8, fp32


def test_int8_export_is_quantized_backbone_only(exported):
    _, int8, _ = exported
    meta = int8.metadata
    assert meta["precision"] == "int8" and meta["quantization"]["calibration_images"] == 4
    graph = onnx.load(str(int8.onnx_path)).graph
    quant = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert quant, "no QDQ nodes: nothing was quantized"
    # every Conv fed by a DequantizeLinear is a backbone Conv; the head's and the mapper's convolutions stay float
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in graph.node:
        if n.op_type == "Conv" and n.input[1] in produced_by_dq:
            assert n.name.startswith(BACKBONE_SCOPE), n.name
    assert any(
        n.op_type == "Conv" and not n.name.startswith(BACKBONE_SCOPE) and n.input[1] not in produced_by_dq
        for n in graph.node
    )


def test_int8_scores_close_to_fp32(exported):
    _, int8, fp32 = exported
    images = demo_images(3) + demo_images(3, defect=True)
    a = OnnxDetector(int8.onnx_path).predict(images)
    b = OnnxDetector(fp32.onnx_path).predict(images)
    err = float(np.abs(a.image_scores - b.image_scores).max() / np.abs(b.image_scores).max())
    assert 0 < err < INT8_SCORE_RTOL
    assert a.anomaly_maps.shape == b.anomaly_maps.shape


def test_int8_bad_arguments(exported, tmp_path):
    det, _, _ = exported
    with pytest.raises(ValueError, match="calibration_images must be a positive integer"):
        export_onnx_int8(det, tmp_path / "x.onnx", demo_images(2), calibration_images=0)


def test_cli_int8_refuses_head_only(tmp_path, capsys):
    det = fitted_detector("concat")
    model = tmp_path / "m.crd"
    det.save(model)
    rc = main(["export", str(model), "-o", str(tmp_path / "h.onnx"), "--int8", str(tmp_path), "--head-only"])
    assert rc != 0 and "--int8 exports the whole detector" in capsys.readouterr().err
    assert not (tmp_path / "h.onnx").exists()


def test_cli_int8_says_what_is_quantized(tmp_path, capsys):
    """The summary line names the int8 backbone and the float32 head, not "head weights int8"."""
    det = fitted_detector("concat")
    model, images = tmp_path / "m.crd", tmp_path / "calibration"
    det.save(model)
    images.mkdir()
    for i, picture in enumerate(demo_images(4)):
        Image.fromarray(picture).save(images / f"{i}.png")
    rc = main(["export", str(model), "-o", str(tmp_path / "m8.onnx"), "--int8", str(images), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "int8 (backbone convolutions" in out and "head and anomaly map float32" in out
    assert "head weights int8" not in out
