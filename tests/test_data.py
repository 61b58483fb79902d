"""Image inputs (folders, lists, tensors, data set objects) and the MVTec AD / folder layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crd_fast.data import FolderDataset, MVTecAD, Sample, count_images, iter_images, list_image_files, load_mask
from crd_fast.features import ImageReadError, Preprocess


def _png(path: Path, value: int = 100, size=(20, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[0], size[1], 3), value, np.uint8)).save(path)
    return str(path)


def _mask(path: Path, box, size=(20, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)
    return str(path)


def test_folder_lists_images_sorted_and_filtered(tmp_path):
    for name in ("b.png", "a.JPG", "c.bmp"):
        _png(tmp_path / name) if not name.endswith("JPG") else Image.new("RGB", (4, 4)).save(tmp_path / name, "JPEG")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "d.png")
    files = list_image_files(tmp_path)
    assert [Path(f).name for f in files] == ["a.JPG", "b.png", "c.bmp"]
    assert [Path(f).name for f in list_image_files(tmp_path, recursive=True)][-1] == "d.png"
    items = list(iter_images(str(tmp_path)))
    assert [p for p, _ in items] == files and count_images(tmp_path) == 3


def test_iter_images_input_kinds(tmp_path):
    a = _png(tmp_path / "a.png")
    batch = torch.rand(3, 3, 8, 8)
    out = list(iter_images(batch))
    assert len(out) == 3 and all(p is None for p, _ in out) and torch.equal(out[2][1], batch[2])
    assert count_images(batch) == 3
    assert list(iter_images(a)) == [(a, a)]
    arr = np.zeros((8, 8, 3), np.uint8)
    pil = Image.new("RGB", (8, 8))
    mixed = list(iter_images([a, Path(a), arr, pil, batch[0]]))
    assert [p for p, _ in mixed] == [a, a, None, None, None]
    assert mixed[3][1] is pil


def test_iter_images_dataset_objects(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")

    class TupleDataset:  # torchvision ImageFolder style: (image, label)
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return (Image.new("RGB", (8, 8), (i, i, i)), i)

    got = list(iter_images(TupleDataset()))
    assert [p for p, _ in got] == [None, None] and got[1][1].getpixel((0, 0)) == (1, 1, 1)
    samples = [Sample(a, 0), Sample(b, 1, None, "scratch")]
    assert [p for p, _ in iter_images(samples)] == [a, b]
    assert [p for p, _ in iter_images([{"image_path": a}, {"image": b}])] == [a, b]
    assert [p for p, _ in iter_images(x for x in (a, b))] == [a, b]  # a generator: count unknown
    assert count_images(x for x in (a, b)) is None


def test_iter_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        list(iter_images(str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        list(iter_images(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        list(iter_images(torch.rand(2, 4, 8, 8)))
    with pytest.raises(TypeError, match=r"images\[1\].*int"):
        list(iter_images([str(tmp_path), 5]))
    with pytest.raises(TypeError, match="images must be"):
        list(iter_images(3.5))  # type: ignore[arg-type]


@pytest.fixture()
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    for cat in ("bottle", "grid"):
        base = root / cat
        for i in range(3):
            _png(base / "train" / "good" / f"{i:03d}.png")
        _png(base / "test" / "good" / "000.png")
        for defect in ("crack", "hole"):
            for i in range(2):
                _png(base / "test" / defect / f"{i:03d}.png", 200)
                _mask(base / "ground_truth" / defect / f"{i:03d}_mask.png", (5, 10, 8, 20))
    (root / "license.txt").write_text("not a category")
    return root


def test_mvtec_layout(mvtec):
    assert MVTecAD.categories(mvtec) == ["bottle", "grid"]
    train = MVTecAD(mvtec, "bottle", "train")
    assert len(train) == 3 and train.labels.tolist() == [0, 0, 0] and all(s.mask_path is None for s in train)
    test = MVTecAD(mvtec, "bottle", "test")
    assert test.defect_types == ["crack", "crack", "good", "hole", "hole"]
    assert test.labels.tolist() == [1, 1, 0, 1, 1]
    assert test[0].mask_path.endswith("ground_truth/crack/000_mask.png")
    masks = test.masks()
    assert masks.shape == (5, 20, 30) and masks.dtype == bool
    assert masks[2].sum() == 0 and masks[0].sum() == 5 * 12 and masks[0][5:10, 8:20].all()
    aligned = test.masks(Preprocess(resize=40, crop=32))
    assert aligned.shape == (5, 32, 32) and aligned[0].any() and not aligned[2].any()
    assert [p for p, _ in iter_images(test)] == test.image_paths


def test_mvtec_errors(mvtec):
    with pytest.raises(FileNotFoundError, match=r"category 'cable' not found.*bottle, grid"):
        MVTecAD(mvtec, "cable")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MVTecAD(mvtec / "nope", "bottle")
    with pytest.raises(ValueError, match="split"):
        MVTecAD(mvtec, "bottle", "val")
    _png(mvtec / "bottle" / "train" / "crack" / "000.png")
    with pytest.raises(ValueError, match="defect-free"):
        MVTecAD(mvtec, "bottle", "train")


def test_folder_dataset_with_masks(tmp_path):
    good = [_png(tmp_path / "ok" / f"{i}.png") for i in range(2)]
    bad1 = _png(tmp_path / "dents" / "x.png", 200)
    bad2 = _png(tmp_path / "stains" / "y.png", 200)
    m1 = _mask(tmp_path / "masks" / "dents" / "x_mask.png", (0, 4, 0, 4))
    m2 = _mask(tmp_path / "masks" / "y.png", (1, 3, 1, 3))
    ds = FolderDataset(tmp_path / "ok", [tmp_path / "dents", tmp_path / "stains"], tmp_path / "masks")
    assert ds.image_paths == good + [bad1, bad2]
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.defect_types == ["good", "good", "dents", "stains"]
    assert [s.mask_path for s in ds] == [None, None, m1, m2]
    assert ds.masks()[3].sum() == 4
    named = FolderDataset(None, {"scratch": tmp_path / "dents"})
    assert named.defect_types == ["scratch"] and named[0].mask_path is None and not named[0].load_mask().any()
    with pytest.raises(FileNotFoundError, match="mask folder"):
        FolderDataset(tmp_path / "ok", [], tmp_path / "nomasks")
    with pytest.raises(FileNotFoundError, match="image folder"):
        FolderDataset(tmp_path / "missing")


def test_unreadable_mask_names_the_file(tmp_path):
    bad = tmp_path / "m_mask.png"
    bad.write_text("garbage")
    with pytest.raises(ImageReadError, match="m_mask.png"):
        load_mask(bad)
