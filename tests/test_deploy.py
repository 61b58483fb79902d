"""The onnxruntime predictor: same results as CRDDetector, no torch at run time, clear errors.

Tolerance against CRDDetector.predict: 1e-4 relative to the largest value (measured about 2e-6; the
numpy/PIL preprocessing differs from torchvision's by about 2e-5 per [0, 1] pixel).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from deploy_fixtures import CROP, demo_images, fitted_detector
from PIL import Image

from crd_fast.deploy import DeployError, OnnxDetector, export_onnx
from crd_fast.deploy.imaging import ImageInputError, NumpyPreprocess
from crd_fast.features.preprocess import Preprocess

RTOL = 1e-4


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    det = fitted_detector("concat")
    folder = tmp_path_factory.mktemp("deploy")
    whole = export_onnx(det, folder / "model.onnx")
    head = export_onnx(det, folder / "head.onnx", head_only=True)
    return det, whole, head


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    images = demo_images(2) + demo_images(2, defect=True, size=80)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    Image.fromarray(images[0][:, :, 0]).save(folder / "004_gray.png")  # grayscale files are converted to RGB
    return folder


def test_predict_matches_detector(exported, png_folder):
    det, whole, _ = exported
    runtime = OnnxDetector(whole.onnx_path)
    got, want = runtime.predict(png_folder), det.predict(png_folder, progress=False)
    assert [f.name for f in dataclasses.fields(got)] == [f.name for f in dataclasses.fields(want)]
    assert got.paths == want.paths and len(got) == 5
    assert got.anomaly_maps.shape == want.anomaly_maps.shape == (5, CROP, CROP)
    assert got.image_scores.dtype == np.float64 and got.anomaly_maps.dtype == got.patch_maps.dtype == np.float32
    assert rel_err(got.image_scores, want.image_scores) < RTOL
    assert rel_err(got.anomaly_maps, want.anomaly_maps) < RTOL
    assert rel_err(got.patch_maps, want.patch_maps) < RTOL
    assert got.threshold == want.threshold == det.threshold
    assert np.allclose(got.normalized_scores, want.normalized_scores, atol=1e-4)
    margin = np.abs(want.image_scores - det.threshold) > 1e-3 * want.image_scores.max()
    assert np.array_equal(got.labels[margin], want.labels[margin])


def test_in_memory_images_and_threshold(exported, rng):
    det, whole, _ = exported
    runtime = OnnxDetector(whole.onnx_path, batch_size=2)
    images = [
        rng.random((70, 90, 3)).astype(np.float32),
        (rng.random((64, 64)) * 65535).astype(np.uint16),
        Image.fromarray((rng.random((80, 66, 4)) * 255).astype(np.uint8), mode="RGBA"),
    ]
    got, want = runtime.predict(images), det.predict(images, progress=False)
    assert got.paths == [None] * 3 and rel_err(got.image_scores, want.image_scores) < RTOL
    runtime.set_threshold(None)
    assert runtime.predict(images).labels is None
    runtime.set_threshold(-1.0)
    assert runtime.predict(images).labels.all()


def test_numpy_preprocess_matches_torchvision(rng):
    for h, w, resize, crop in ((300, 400, 256, 224), (100, 120, 256, 224), (72, 61, 64, 64), (64, 64, 64, 60)):
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        want = Preprocess(resize, crop)(image).numpy()
        got = NumpyPreprocess(resize, crop)(image)
        assert got.shape == want.shape == (3, crop, crop)
        assert np.abs(got - want).max() < 2e-4  # about 4e-5 in [0, 1] pixels, after dividing by std ~0.225


def test_head_only_scores_features(exported, rng):
    det, _, head = exported
    runtime = OnnxDetector(head.onnx_path)
    x = torch.from_numpy(rng.standard_normal((2, 3, CROP, CROP)).astype(np.float32))
    maps = det.extract_features(x)
    scores, patch_maps = runtime.score_features({name: m.numpy() for name, m in zip(det.layers, maps)})
    with torch.inference_mode():
        want_scores, _, want_maps = det.inference_model()(x)
    assert rel_err(patch_maps, want_maps.numpy()) < RTOL and rel_err(scores, want_scores.numpy()) < RTOL
    as_list = runtime.score_features([m.numpy() for m in maps])[1]
    assert np.array_equal(as_list, patch_maps)


NO_TORCH_SCRIPT = textwrap.dedent("""
    import json, sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, BlockTorch())
    from crd_fast.deploy import OnnxDetector

    result = OnnxDetector(sys.argv[1]).predict(sys.argv[2])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
    print(json.dumps({"scores": result.image_scores.tolist(), "map_sum": float(result.anomaly_maps.sum()),
                      "labels": result.labels.tolist(), "torch_modules": loaded}))
""")


def test_runtime_needs_no_torch(exported, png_folder):
    _, whole, _ = exported
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(whole.onnx_path), str(png_folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_modules"] == []
    same = OnnxDetector(whole.onnx_path).predict(png_folder)
    np.testing.assert_allclose(out["scores"], same.image_scores, rtol=1e-6)
    assert out["labels"] == same.labels.tolist()
    assert out["map_sum"] == pytest.approx(float(same.anomaly_maps.sum()), rel=1e-5)


def copy_export(result, folder):
    onnx_path, meta_path = folder / "m.onnx", folder / "m.onnx.json"
    shutil.copy(result.onnx_path, onnx_path)
    shutil.copy(result.metadata_path, meta_path)
    return onnx_path, meta_path


def test_corrupted_or_mismatched_files(exported, tmp_path):
    _, whole, head = exported
    onnx_path, meta_path = copy_export(whole, tmp_path)
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(DeployError, match="does not match its metadata.*modified or truncated"):
        OnnxDetector(onnx_path)
    onnx_path.write_bytes(whole.onnx_path.read_bytes()[:1000])
    with pytest.raises(DeployError, match="does not match its metadata"):
        OnnxDetector(onnx_path)
    shutil.copy(head.metadata_path, meta_path)  # metadata of another export
    onnx_path.write_bytes(whole.onnx_path.read_bytes())
    with pytest.raises(DeployError, match="does not match its metadata"):
        OnnxDetector(onnx_path)
    meta_path.unlink()
    with pytest.raises(DeployError, match="metadata file missing"):
        OnnxDetector(onnx_path)
    meta_path.write_text('{"format": "crd-fast-onnx", "format_ver')
    with pytest.raises(DeployError, match="not valid JSON"):
        OnnxDetector(onnx_path)
    meta_path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DeployError, match="not a crd_fast ONNX metadata file"):
        OnnxDetector(onnx_path)
    with pytest.raises(DeployError, match="no such ONNX file"):
        OnnxDetector(tmp_path / "missing.onnx")


def test_unloadable_graph_and_signature_mismatch(exported, tmp_path):
    _, whole, head = exported
    onnx_path, meta_path = copy_export(whole, tmp_path)
    meta = json.loads(meta_path.read_text())
    onnx_path.write_bytes(b"not a protobuf at all")
    meta["onnx_sha256"] = __import__("hashlib").sha256(b"not a protobuf at all").hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="onnxruntime cannot load"):
        OnnxDetector(onnx_path)
    onnx_path.write_bytes(head.onnx_path.read_bytes())  # a head graph behind whole-detector metadata
    meta["onnx_sha256"] = json.loads(head.metadata_path.read_text())["onnx_sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="inputs.*differ from the metadata"):
        OnnxDetector(onnx_path)


def test_expected_values_and_wrong_inputs(exported, rng):
    _, whole, head = exported
    with pytest.raises(DeployError, match="embedding='concat', expected 'patchcore'"):
        OnnxDetector(whole.onnx_path, embedding="patchcore")
    runtime = OnnxDetector(whole.onnx_path, embedding="concat", crop=CROP, head_only=False)
    with pytest.raises(DeployError, match=r"must have shape \(B, 3, 64, 64\), got \(2, 3, 32, 32\)"):
        runtime.run(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    with pytest.raises(DeployError, match="floating point"):
        runtime.run(np.zeros((1, 3, CROP, CROP), dtype=np.int64))
    with pytest.raises(ImageInputError, match=r"image 1: image values must be in \[0, 1\]"):
        runtime.predict([rng.random((64, 64, 3)), rng.random((64, 64, 3)) * 255])
    with pytest.raises(DeployError, match="head-only export"):
        OnnxDetector(head.onnx_path).predict([rng.random((64, 64, 3))])
    head_rt = OnnxDetector(head.onnx_path)
    shapes = head.metadata["feature_shapes"]
    good = [rng.standard_normal((2, *s)).astype(np.float32) for s in shapes]
    with pytest.raises(DeployError, match=r"missing \['layer3'\]"):
        head_rt.score_features({"layer2": good[0]})
    with pytest.raises(DeployError, match="input 'layer3' must have shape"):
        head_rt.score_features([good[0], good[1][:, :10]])
    with pytest.raises(DeployError, match="batch size 1, the other inputs have 2"):
        head_rt.score_features([good[0], good[1][:1]])
    with pytest.raises(DeployError, match="expected 2 feature maps"):
        head_rt.score_features(good[:1])
