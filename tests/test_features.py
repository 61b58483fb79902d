"""Backbones (weights sources, layer cutting) and preprocessing (image modes, sizes, errors)."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from crd_fast.features import (
    BackboneWeightsError,
    FeatureExtractor,
    ImageReadError,
    Preprocess,
    build_backbone,
    load_image,
    to_unit_tensor,
    weights_identity,
)
from crd_fast.features.preprocess import IMAGENET_MEAN, IMAGENET_STD


def _x(seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- backbones -----------------------------------------------------------------------------------
def test_random_weights_are_seeded():
    a = FeatureExtractor("resnet18", ("layer2", "layer3"), "random", seed=5)
    b = FeatureExtractor("resnet18", ("layer2", "layer3"), "random", seed=5)
    c = FeatureExtractor("resnet18", ("layer2", "layer3"), "random", seed=6)
    x = _x()
    with torch.inference_mode():
        fa, fb, fc = a(x), b(x), c(x)
    assert all(torch.equal(p, q) for p, q in zip(fa, fb))
    assert not torch.allclose(fa[1], fc[1])


def test_random_weights_do_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_backbone("resnet18", "random", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_layers_shapes_order_and_cut():
    ext = FeatureExtractor("resnet18", ("layer3", "layer1"), "random")
    assert ext.feature_shapes(64) == [(256, 4, 4), (64, 16, 16)]
    assert "layer4" not in ext.body and "layer3" in ext.body  # cut after the deepest requested stage
    full = build_backbone("resnet18", "random", seed=0)
    with torch.inference_mode():
        x = _x()
        y = full.maxpool(full.relu(full.bn1(full.conv1(x))))
        ref3 = full.layer3(full.layer2(full.layer1(y)))
        out = ext(x)
    assert torch.equal(out[0], ref3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backbone="resnet18", layers=("layer9",)), "unknown layer"),
        (dict(backbone="vgg19", layers=("layer2",)), "unknown backbone"),
        (dict(backbone="resnet18", layers=()), "non-empty"),
        (dict(backbone="resnet18", layers=("layer2", "layer2")), "repeat"),
    ],
)
def test_bad_extractor_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureExtractor(weights="random", **kwargs)


@pytest.fixture(scope="module")
def seeded_features():
    """State dict of a seed-11 resnet18 and the features the seed-11 / seed-0 extractors give on a fixed input."""
    state = {k: v.clone() for k, v in build_backbone("resnet18", "random", seed=11).state_dict().items()}
    x = _x(1)
    with torch.inference_mode():
        want = FeatureExtractor("resnet18", ("layer2", "layer3"), weights="random", seed=11)(x)
        unlike = FeatureExtractor("resnet18", ("layer2", "layer3"), weights="random", seed=0)(x)
    return state, x, want, unlike


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "headless_pth", "wrapped_pth"])
def test_weights_from_local_file(tmp_path, fmt, seeded_features):
    state, x, want, unlike = seeded_features
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif fmt == "headless_pth":
        torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    elif fmt == "wrapped_pth":
        torch.save({"state_dict": state}, path)
    else:
        torch.save(state, path)
    loaded = FeatureExtractor("resnet18", ("layer2", "layer3"), weights=str(path))
    with torch.inference_mode():
        got = loaded(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not torch.allclose(got[0], unlike[0])
    ident = weights_identity(str(path))
    assert ident["kind"] == "file" and len(ident["sha256"]) == 64


def test_weights_file_errors(tmp_path):
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="junk.pth"):
        build_backbone("resnet18", str(junk))
    wrong = tmp_path / "r34.pth"
    torch.save(build_backbone("resnet34", "random").state_dict(), wrong)
    with pytest.raises(BackboneWeightsError, match="do not match"):
        build_backbone("resnet18", str(wrong))
    with pytest.raises(ValueError, match="weights must be"):
        build_backbone("resnet18", 42)  # type: ignore[arg-type]


def test_imagenet_offline_fails_clearly_without_fallback(monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneWeightsError, match=r"ImageNet weights for resnet18.*pass its path as weights="):
        FeatureExtractor("resnet18", ("layer2",), weights="imagenet")
    assert len(calls) == 1 and "resnet18" in calls[0]
    from crd_fast import CRDDetector

    with pytest.raises(BackboneWeightsError, match="no network"):
        CRDDetector(backbone="resnet18", weights="imagenet", resize=80, crop=64)


def test_imagenet_uses_cached_state_dict(monkeypatch):
    # Where the hub cache (or a network) provides the file, its tensors are loaded as they are.
    state = build_backbone("resnet18", "random", seed=3).state_dict()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, *a, **k: state)
    model = build_backbone("resnet18", "imagenet")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_custom_module_backbone():
    class TwoMaps(nn.Module):
        def forward(self, x):
            return [x[:, :2, ::2, ::2], x.mean(dim=1, keepdim=True)[:, :, ::4, ::4]]

    ext = FeatureExtractor(TwoMaps(), ("a", "b"))
    assert ext.feature_shapes(16) == [(2, 8, 8), (1, 4, 4)]


# ---- preprocessing ---------------------------------------------------------------------------------
def _rgb(seed=0, h=40, w=50) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_preprocess_sizes_and_normalisation():
    pre = Preprocess(resize=40, crop=32)
    out = pre(Image.new("RGB", (70, 50), (128, 128, 128)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 5, 7], expected.float(), rtol=0, atol=1e-5)
    # Shorter side to 40 then a center crop: a 50 x 70 (h x w) image becomes 40 x 56 first.
    marker = np.zeros((50, 70, 3), np.uint8)
    marker[:, 35:] = 255  # right half white
    disp = pre.display(marker)
    assert disp.shape == (32, 32, 3) and disp[:, :14].max() == 0 and disp[:, 18:].min() == 255


def test_same_picture_same_input_whatever_its_kind():
    arr = _rgb()
    pre = Preprocess(resize=40, crop=32)
    a = pre(Image.fromarray(arr))
    b = pre(arr)
    c = pre(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    d = pre.batch(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255)[0]
    e = pre(torch.from_numpy(arr).permute(2, 0, 1))  # uint8 tensor
    for t in (b, c, d, e):
        assert torch.equal(a, t)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1", "LA"])
def test_image_modes_are_converted(tmp_path, mode):
    arr = _rgb(1)
    gray = arr[:, :, 0]
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "L":
        Image.fromarray(gray, "L").save(path)
        expected = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "LA":
        Image.fromarray(np.stack([gray, arr[:, :, 1]], -1), "LA").save(path)
        expected = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "RGBA":
        Image.fromarray(np.concatenate([arr, arr[:, :, :1]], axis=2), "RGBA").save(path)
        expected = arr
    elif mode == "P":
        pal = Image.fromarray(arr).quantize(colors=16)
        pal.save(path)
        expected = np.asarray(pal.convert("RGB"))
    elif mode == "1":
        bits = gray > 127
        Image.fromarray(bits).save(path)
        expected = np.repeat((bits * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    else:  # 16-bit grayscale: v * 257 spans the full 16-bit range and maps back to v
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)
        expected = np.repeat(gray[:, :, None], 3, axis=2)
    img = load_image(path)
    assert Image.open(path).mode == mode
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_unreadable_files_name_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        load_image(text)
    with pytest.raises(ImageReadError, match=r"missing\.png.*no such file"):
        load_image(tmp_path / "missing.png")
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(2, 64, 64)).save(good)
    cut = tmp_path / "truncated.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="truncated.png"):
        load_image(cut)


def test_bad_in_memory_images():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_unit_tensor(torch.full((3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="shape"):
        to_unit_tensor(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        to_unit_tensor("image.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop"):
        Preprocess(resize=32, crop=64)


def test_mask_follows_the_image_geometry():
    pre = Preprocess(resize=40, crop=32)
    mask = np.zeros((50, 70), bool)
    mask[20:30, 30:45] = True
    img = np.zeros((50, 70, 3), np.uint8)
    img[mask] = 255
    out = pre.mask(mask)
    disp = pre.display(img)[:, :, 0]
    assert out.shape == (32, 32) and out.dtype == bool
    # The nearest-resized mask and the bilinear-resized picture agree away from the edges.
    assert np.all(disp[out] > 60) and np.all(disp[~out & (disp < 5)] < 5) and out.sum() > 20
