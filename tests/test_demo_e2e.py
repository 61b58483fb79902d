"""End to end: the built-in demo, reduced (``crd-fast demo --quick``), through the command line.

With the default backbone (EfficientNet-Lite0, its packaged ImageNet weights) it writes a split of the real
polycrystalline solar cells (elpv-dataset) and the generated categories, fits, evaluates beside PaDiM's rule and exact
nearest-neighbour search on the same features and writes the report. The generated defects must be found (image and
pixel AUROC >= 0.9 in every category), the real cells better than chance, and no random-weight banner may appear.
"""

from __future__ import annotations

import json

import pytest

from crd_fast.cli.main import main
from crd_fast.data import elpv
from crd_fast.synthetic import MARKER

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.mark.slow
def test_quick_demo_on_real_and_generated_parts(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "RANDOM" not in printed.out + printed.err and f"report: {out / 'report.html'}" in printed.out
    doc = json.loads((out / "report.json").read_text())
    assert doc["run"]["random_weights"] is False
    assert (
        doc["run"]["settings"]["backbone"] == "efficientnet_lite0" and doc["run"]["settings"]["weights"] == "imagenet"
    )
    names = [c["name"] for c in doc["categories"]]
    real = elpv.available()
    assert names == ([elpv.CATEGORY] if real else []) + ["fabric", "cap"]
    for c in doc["categories"]:
        m = c["metrics"]
        for peer in ("nn", "padim"):  # the other rules ran on the same features
            assert c["extra"][peer]["image_auroc"] is not None, (c["name"], peer)
        if c["name"] == elpv.CATEGORY:
            assert (out / "data" / c["name"] / elpv.MARKER).is_file()
            assert c["n_good"] == 20 and c["n_defect"] == 20 and m["pixel_auroc"] is None  # no masks exist
            assert m["image_auroc"] >= 0.65, m  # real cracks, 40 training cells: far above chance
            continue
        assert (out / "data" / c["name"] / MARKER).is_file()
        assert c["n_good"] == 10 and c["n_defect"] == 12 and len(c["defect_types"]) >= 4
        assert m["image_auroc"] >= 0.9 and m["pixel_auroc"] >= 0.9, (c["name"], m)
        assert m["aupro"] is not None and m["f1_max"] is not None
    html = (out / "report.html").read_text()
    assert "RANDOM" not in html and "data:image/png;base64," in html  # self-contained, with figures
    assert "PaDiM&#x27;s rule" in html or "PaDiM's rule" in html


@pytest.mark.slow
def test_random_weights_are_said_wherever_they_are_used(tmp_path, capsys):
    args = ["demo", "--quick", "--no-real", "--no-compare", "--categories", "cap", "--n-train", "8"]
    args += ["--backbone", "resnet18", "--weights", "random", "--out", str(tmp_path / "d"), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "RANDOM" in printed.out and "NOT the detector's accuracy" in printed.out
    assert "RANDOM" in (tmp_path / "d" / "report.html").read_text()
    assert json.loads((tmp_path / "d" / "report.json").read_text())["run"]["random_weights"] is True


def test_demo_rejects_unknown_category(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--categories", "fabric,wood"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crd-fast: error: ") and "wood" in err and "\n" not in err
    assert not (tmp_path / "d" / "data").exists()  # refused before writing anything
