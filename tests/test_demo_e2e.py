"""End to end: the built-in demo, reduced (``crd-fast demo --quick``), through the command line.

It generates the synthetic MVTec-layout data, fits a seeded random resnet18 per category, evaluates,
compares with exact nearest-neighbour search and writes the report. The generated defects must be found:
image AUROC and pixel AUROC of at least 0.9 in every category.
"""

from __future__ import annotations

import json

import pytest

from crd_fast.cli.main import main
from crd_fast.synthetic import MARKER

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.mark.slow
def test_quick_demo_finds_the_defects(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "RANDOM" in printed.out and "NOT the detector's accuracy" in printed.out
    assert f"report: {out / 'report.html'}" in printed.out

    doc = json.loads((out / "report.json").read_text())
    assert doc["run"]["random_weights"] is True
    assert doc["run"]["settings"]["backbone"] == "resnet18" and doc["run"]["settings"]["weights"] == "random"
    names = [c["name"] for c in doc["categories"]]
    assert names == ["fabric", "cap"]  # a periodic texture and an object with a fixed layout
    for c in doc["categories"]:
        assert (out / "data" / c["name"] / MARKER).is_file()
        assert c["n_good"] == 10 and c["n_defect"] == 12 and len(c["defect_types"]) >= 4
        m = c["metrics"]
        assert m["image_auroc"] >= 0.9, (c["name"], m)
        assert m["pixel_auroc"] >= 0.9, (c["name"], m)
        assert m["aupro"] is not None and m["f1_max"] is not None
        assert c["extra"]["nn"]["image_auroc"] is not None  # the NN comparison ran on the same features
    html = (out / "report.html").read_text()
    assert "RANDOM" in html and "data:image/png;base64," in html  # self-contained, with figures


def test_demo_rejects_unknown_category(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--categories", "fabric,wood"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crd-fast: error: ") and "wood" in err and "\n" not in err
    assert not (tmp_path / "d" / "data").exists()  # refused before writing anything
