"""The real solar cells the demo and the quality study use (crd_fast/data/elpv.py): a seeded, disjoint split of the
polycrystalline cells written in the MVTec AD layout, and the errors for a missing package or a foreign folder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crd_fast.data import MVTecAD, elpv

pytestmark = pytest.mark.skipif(not elpv.available(), reason=f"needs {elpv.PACKAGE}: {elpv.INSTALL_HINT}")


def _pixels(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_a_seeded_disjoint_split_in_the_mvtec_layout(tmp_path):
    split = elpv.write_elpv_poly(tmp_path, n_train=12, n_test_good=4, n_test_defect=5, seed=3)
    assert split.root == tmp_path / "elpv_poly"
    train = _pixels(split.root / "train" / "good")
    good, bad = _pixels(split.root / "test" / "good"), _pixels(split.root / "test" / "defect")
    assert (len(train), len(good), len(bad)) == (12, 4, 5) and train[0].shape == (300, 300)
    seen = {a.tobytes() for a in train}
    assert not seen & {a.tobytes() for a in good + bad}  # no training cell is tested
    all_good, all_bad = elpv.poly_cells()
    assert (len(all_good), len(all_bad)) == (elpv.POLY_GOOD, elpv.POLY_DEFECTIVE)
    assert {a.tobytes() for a in bad} <= {a.tobytes() for a in all_bad}
    test = MVTecAD(tmp_path, "elpv_poly", "test")
    assert sorted(np.asarray(test.labels).tolist()) == [0] * 4 + [1] * 5
    again = elpv.write_elpv_poly(tmp_path, n_train=12, n_test_good=4, n_test_defect=5, seed=3)  # its own folder
    assert [a.tobytes() for a in _pixels(again.root / "train" / "good")] == [a.tobytes() for a in train]
    other = elpv.write_elpv_poly(tmp_path / "b", n_train=12, n_test_good=4, n_test_defect=5, seed=4)
    assert [a.tobytes() for a in _pixels(other.root / "train" / "good")] != [a.tobytes() for a in train]


def test_bad_counts_and_foreign_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_train must be an integer >= 1"):
        elpv.write_elpv_poly(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="the package holds 920 and 402"):
        elpv.write_elpv_poly(tmp_path, n_test_defect=500)
    (tmp_path / "elpv_poly").mkdir()
    (tmp_path / "elpv_poly" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        elpv.write_elpv_poly(tmp_path, n_train=3, n_test_good=1, n_test_defect=1)
    assert (tmp_path / "elpv_poly" / "mine.txt").read_text() == "user data"
