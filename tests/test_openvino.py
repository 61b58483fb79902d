"""OpenVINO export and runtime: the same results as CRDDetector (like the ONNX runtime), f32 unless asked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deploy_fixtures import CROP, demo_images, fitted_detector

from crd_fast.cli.main import main
from crd_fast.deploy import DeployError

ov = pytest.importorskip("openvino", reason="OpenVINO export needs the optional extra crd-fast[openvino]")
from crd_fast.deploy.openvino import OpenVinoDetector, export_openvino  # noqa: E402

RTOL = 1e-4  # as tests/test_deploy.py: relative to the largest value (preprocessing differs by ~2e-5 per pixel)


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=["concat", "patchcore"])
def exported(request, tmp_path_factory):
    det = fitted_detector(request.param)
    folder = tmp_path_factory.mktemp("ov")
    export_openvino(det, folder / "model.xml")
    export_openvino(det, folder / "head.xml", head_only=True)
    return det, folder


def test_predict_matches_detector(exported):
    det, folder = exported
    runtime = OpenVinoDetector(folder / "model.xml")
    assert runtime.inference_precision == "f32"
    images = demo_images(3) + demo_images(3, defect=True, size=80)
    got, want = runtime.predict(images), det.predict(images, progress=False)
    assert got.anomaly_maps.shape == want.anomaly_maps.shape == (6, CROP, CROP)
    assert rel_err(got.image_scores, want.image_scores) < RTOL
    assert rel_err(got.anomaly_maps, want.anomaly_maps) < RTOL
    assert rel_err(got.patch_maps, want.patch_maps) < RTOL
    assert got.threshold == det.threshold
    margin = np.abs(want.image_scores - det.threshold) > 1e-3 * want.image_scores.max()
    assert np.array_equal(got.labels[margin], want.labels[margin])


def test_head_only_matches_detector(exported, rng):
    det, folder = exported
    runtime = OpenVinoDetector(folder / "head.xml")
    x = det.preprocess.batch(torch.from_numpy(rng.random((2, 3, CROP, CROP)).astype(np.float32)))
    feats = [f.numpy() for f in det.extract_features(x)]
    scores, pmaps = runtime.score_features(feats)
    with torch.inference_mode():
        _, _, want = det.inference_model()(x)
    assert rel_err(pmaps, want.numpy()) < RTOL
    assert rel_err(scores, want.numpy().reshape(2, -1).max(axis=1)) < RTOL
    with pytest.raises(DeployError, match="head-only"):
        runtime.predict(demo_images(1))


def test_precision_hint_is_honoured(exported):
    _, folder = exported
    # Without the hint OpenVINO picks (bf16 on CPUs with AVX512-BF16 / AMX); "f16" asked is what is reported.
    precision = OpenVinoDetector(folder / "model.xml", inference_precision=None).inference_precision
    assert precision in ("f32", "bf16", "f16")


def test_tampered_files_are_refused(exported, tmp_path):
    _, folder = exported
    import shutil

    for name in ("model.xml", "model.bin", "model.xml.json"):
        shutil.copy2(folder / name, tmp_path / name)
    with open(tmp_path / "model.bin", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DeployError, match="does not match its metadata"):
        OpenVinoDetector(tmp_path / "model.xml")
    (tmp_path / "model.bin").unlink()
    with pytest.raises(DeployError, match="no such OpenVINO weights file"):
        OpenVinoDetector(tmp_path / "model.xml")
    with pytest.raises(ValueError, match=r"must end in \.xml"):
        export_openvino(fitted_detector("concat"), tmp_path / "model.onnx")


def test_cli_export_openvino(tmp_path, capsys):
    det = fitted_detector("concat")
    model = tmp_path / "m.crd"
    det.save(model)
    out = tmp_path / "ov" / "m.xml"
    assert main(["export", str(model), "-o", str(out), "--format", "openvino", "--no-progress"]) == 0
    assert "openvino" in capsys.readouterr().out.lower()
    meta = json.loads((tmp_path / "ov" / "m.xml.json").read_text())
    assert meta["format"] == "crd-fast-openvino" and (tmp_path / "ov" / "m.bin").is_file()
    images = demo_images(2)
    got = OpenVinoDetector(out).predict(images).image_scores
    assert rel_err(got, det.predict(images, progress=False).image_scores) < RTOL
