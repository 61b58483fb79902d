"""Synthetic MVTec-layout data: layout, determinism, exact masks, variation between samples, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from crd_fast.synthetic import CATEGORIES, MARKER, PAINTERS, generate_dataset, render_sample
from crd_fast.synthetic.scenes import render_stone

SIZE = 96  # small and fast; every size-dependent length scales with it


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    ds = generate_dataset(
        root, categories=("fabric", "stone", "cap"), n_train=3, n_test_good=2, n_test_defect=5, size=SIZE, seed=7
    )
    return root, ds


def test_mvtec_layout(dataset):
    root, ds = dataset
    for category in ("fabric", "stone", "cap"):
        cat = root / category
        assert (cat / MARKER).is_file()
        assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (cat / "test" / "good").iterdir()) == ["000.png", "001.png"]
        defect_dirs = sorted(p.name for p in (cat / "test").iterdir() if p.name != "good")
        # 5 defective images round-robin over the category's types: the first type gets 2
        kinds = CATEGORIES[category].defects
        assert defect_dirs == sorted(kinds)
        counts = {d: len(list((cat / "test" / d).iterdir())) for d in kinds}
        assert counts == {d: (2 if i == 0 else 1) for i, d in enumerate(kinds)}
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(kinds)
        for d in kinds:
            images = sorted(p.stem for p in (cat / "test" / d).iterdir())
            masks = sorted(p.name for p in (cat / "ground_truth" / d).iterdir())
            assert masks == [f"{s}_mask.png" for s in images]
        assert not (cat / "ground_truth" / "good").exists()
    assert ds.counts()["cap"]["train/good"] == 3


def test_images_and_masks_are_well_formed(dataset):
    root, _ = dataset
    for png in root.rglob("*.png"):
        with Image.open(png) as im:
            assert im.size == (SIZE, SIZE)
            if "ground_truth" in png.parts:
                assert im.mode == "L"
                values = set(np.unique(np.asarray(im)).tolist())
                assert values == {0, 255}, f"{png} is not a non-empty 0/255 mask: {values}"
            else:
                assert im.mode == "RGB"


def test_deterministic_by_seed(dataset, tmp_path):
    root, _ = dataset
    generate_dataset(
        tmp_path / "a",
        categories=("fabric", "stone", "cap"),
        n_train=3,
        n_test_good=2,
        n_test_defect=5,
        size=SIZE,
        seed=7,
    )
    assert _files(tmp_path / "a") == _files(root)  # byte-identical
    generate_dataset(tmp_path / "b", categories=("cap",), n_train=3, n_test_good=2, n_test_defect=5, size=SIZE, seed=8)
    other = _files(tmp_path / "b")
    same = _files(root)
    assert all(other[k] != same[k] for k in other if k.endswith(".png") and "ground_truth" not in k)
    # the files equal what render_sample returns for the same keys
    image, mask = render_sample("cap", size=SIZE, seed=7, defect="crack", index=0)
    assert np.array_equal(np.asarray(Image.open(root / "cap/test/crack/000.png")), image)
    assert np.array_equal(np.asarray(Image.open(root / "cap/ground_truth/crack/000_mask.png")) > 0, mask)


def test_good_images_vary(dataset):
    root, _ = dataset
    for category in ("fabric", "stone", "cap"):
        imgs = [
            np.asarray(Image.open(p), dtype=np.float64) for p in sorted((root / category / "train" / "good").iterdir())
        ]
        for i in range(len(imgs)):
            for j in range(i + 1, len(imgs)):
                assert np.abs(imgs[i] - imgs[j]).mean() > 2.0, (
                    f"{category}: train images {i} and {j} are near duplicates"
                )
    good, mask = render_sample("stone", size=SIZE, seed=7, defect=None, index=0)
    assert not mask.any()


@pytest.mark.parametrize("category,defect", [(c, d) for c, spec in CATEGORIES.items() for d in spec.defects])
def test_defect_changes_exactly_the_masked_pixels(category, defect):
    render = CATEGORIES[category].render
    rng = np.random.default_rng(11)
    scene = render(rng, 128)
    image, mask = PAINTERS[defect](rng, scene)
    assert mask.dtype == bool and mask.shape == (128, 128)
    assert mask.sum() >= 12
    change = np.abs(image - scene.image).max(axis=2)
    assert change[mask].mean() > 0.12, "the defect is not visible inside its mask"
    # outside the mask (and its 1-pixel anti-aliased rim) the image is untouched
    rim = ndimage.binary_dilation(mask, iterations=2)
    assert (change[~rim] > 0.05).sum() <= 0.02 * mask.sum() + 2
    assert (mask & (scene.surface < 0.5)).sum() == 0  # never on the background of an object


def test_every_category_and_defect_renders_a_mask():
    for name, spec in CATEGORIES.items():
        for d in spec.defects:
            image, mask = render_sample(name, size=128, seed=0, defect=d, index=3)
            assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
            assert mask.any() and not mask.all()


def test_overwrite_only_generated_folders(tmp_path):
    generate_dataset(tmp_path, categories=("stone",), n_train=3, n_test_good=1, n_test_defect=1, size=64)
    generate_dataset(tmp_path, categories=("stone",), n_train=2, n_test_good=1, n_test_defect=1, size=64)
    assert sorted(p.name for p in (tmp_path / "stone" / "train" / "good").iterdir()) == ["000.png", "001.png"]
    (tmp_path / "cap" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by crd_fast"):
        generate_dataset(tmp_path, categories=("cap",), n_train=1, n_test_good=1, n_test_defect=1, size=64)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic category 'wood'"):
        generate_dataset(tmp_path, categories=("wood",))
    with pytest.raises(ValueError, match="n_train must be an integer >= 1"):
        generate_dataset(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="size must be at least 64"):
        generate_dataset(tmp_path, size=32)
    with pytest.raises(ValueError, match="has no defect type 'missing'"):
        render_sample("stone", defect="missing")
    with pytest.raises(ValueError, match="needs an object .* or a woven texture"):
        PAINTERS["missing"](np.random.default_rng(0), render_stone(np.random.default_rng(0), 64))
    with pytest.raises(ValueError, match="categories is empty"):
        generate_dataset(tmp_path, categories=())
