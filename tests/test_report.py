"""Heatmap overlays and the HTML/JSON report: self-contained page, figures equal to evaluation.metrics, banner."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from crd_fast.metrics import scores as M
from crd_fast.report import RANDOM_WEIGHTS_WARNING, CategoryResult, RunInfo, example_indices, write_report
from crd_fast.report.overlay import heatmap_overlay, normalize_map, save_png
from crd_fast.report.tables import digits, header, label
from crd_fast.synthetic import render_sample

# ------------------------------------------------------------------------------------------ viz


def test_overlay_blends_image_and_colormap():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    amap = rng.random((12, 16))
    assert np.array_equal(heatmap_overlay(image, amap, alpha=0.0), image)
    full = heatmap_overlay(image, amap, alpha=1.0, cmap="inferno")
    expected = colormaps["inferno"]((amap - amap.min()) / (amap.max() - amap.min()), bytes=True)[..., :3]
    assert np.array_equal(full, expected)
    half = heatmap_overlay(Image.fromarray(image), amap, alpha=0.5)
    assert half.dtype == np.uint8 and half.shape == (12, 16, 3)
    jet = colormaps["jet"]((amap - amap.min()) / (amap.max() - amap.min()), bytes=True)[..., :3]
    assert np.abs(half.astype(int) - (image.astype(int) + jet.astype(int)) / 2).max() <= 0.5 + 1e-9


def test_overlay_value_range_and_contour():
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    amap = np.linspace(0, 2, 100).reshape(10, 10)
    vals = normalize_map(amap, vmin=0.5, vmax=1.5)
    assert vals.min() == 0.0 and vals.max() == 1.0 and vals[5, 0] == pytest.approx((amap[5, 0] - 0.5) / 1.0)
    mask = np.zeros((10, 10), dtype=bool)
    mask[3:7, 3:7] = True
    out = heatmap_overlay(image, amap, alpha=0.0, mask=mask, contour_color=(0, 255, 0))
    edge = mask & ~ndimage.binary_erosion(mask)
    assert (out[edge] == (0, 255, 0)).all()
    assert (out[~edge] == 0).all()  # inside and outside the outline: the (black) image


def test_overlay_bad_input():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not match the image size"):
        heatmap_overlay(image, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        heatmap_overlay(image, np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="alpha must be in"):
        heatmap_overlay(image, np.zeros((8, 8)), alpha=2)
    with pytest.raises(ValueError, match="unknown matplotlib colormap"):
        heatmap_overlay(image, np.zeros((8, 8)), cmap="nope")
    with pytest.raises(ValueError, match="mask shape"):
        heatmap_overlay(image, np.zeros((8, 8)), mask=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="vmax .* is below vmin"):
        normalize_map(np.zeros((2, 2)), vmin=1, vmax=0)


def test_save_png_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "sub" / "x.png", arr)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "x.png")), arr)
    save_png(tmp_path / "m.png", arr[..., 0] > 128)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m.png")))) <= {0, 255}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["m.png", "x.png"]  # no temp files left


# ---------------------------------------------------------------------------------------- report


def _category(name: str, seed: int, size: int = 64) -> CategoryResult:
    """Real synthetic images with noisy maps that partly find the defects."""
    rng = np.random.default_rng(seed)
    kinds = [None] * 6 + ["scratch", "crack", "stain", "missing"] * 2
    images, masks = zip(*(render_sample("cap", size=size, seed=seed, defect=d, index=i) for i, d in enumerate(kinds)))
    masks = np.stack(masks)
    maps = ndimage.gaussian_filter(rng.random(masks.shape) + 0.8 * masks, (0, 2, 2))
    return CategoryResult(
        name=name,
        labels=[d is not None for d in kinds],
        image_scores=maps.max(axis=(1, 2)) + 0.05 * rng.standard_normal(len(kinds)),
        masks=masks,
        anomaly_maps=maps.astype(np.float32),
        images={i: img for i, img in enumerate(images) if i % 2 == 0},  # only some images kept
        paths=[f"{name}/test/{d or 'good'}/{i:03d}.png" for i, d in enumerate(kinds)],
        defect_types=[d or "good" for d in kinds],
        fit_seconds=1.25,
        ms_per_image=12.5,
        extra={"nn": {"image_auroc": 0.9, "ms_per_image": 40.0}},
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = [_category("cap_a", 0), _category("cap_b", 1)]
    run = RunInfo(
        settings={"backbone": "resnet18", "layers": ["layer2", "layer3"], "lam_rel": 0.01},
        weights="random (seed 0)",
        command="crd-fast demo --seed 0",
    )
    return out, results, write_report(out, results, run, n_examples=3)


def test_files_written_atomically(report):
    out, _, rep = report
    assert rep.html_path == out / "report.html" and rep.json_path == out / "report.json"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]


def test_html_is_self_contained(report):
    _, _, rep = report
    text = rep.html_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text)
    assert links, "the page embeds its pictures"
    assert all(link.startswith("data:image/png;base64,") for link in links)
    assert "<script" not in text and "<link" not in text and "url(" not in text
    # 2 curve plots + per category up to 3 groups x 3 examples
    assert len(links) == 2 + 2 * 9
    assert "cap_a" in text and "crd-fast demo --seed 0" in text and "lam_rel" in text


def test_json_matches_metrics_module(report):
    _, results, rep = report
    data = json.loads(rep.json_path.read_text(encoding="utf-8"))
    assert data == rep.data
    for result, cat in zip(results, data["categories"]):
        y, s = result.labels, result.image_scores
        m = cat["metrics"]
        assert m["image_auroc"] == M.image_auroc(y, s)
        assert m["pixel_auroc"] == pytest.approx(M.pixel_auroc(result.masks, result.anomaly_maps), rel=1e-12)
        assert m["aupro"] == pytest.approx(M.aupro(result.masks, result.anomaly_maps), rel=1e-12)
        assert (m["f1_max"], m["f1_threshold"]) == M.f1_max(y, s)
        assert m["fit_seconds"] == 1.25 and m["ms_per_image"] == 12.5
        assert cat["extra"] == {"nn": {"image_auroc": 0.9, "ms_per_image": 40.0}}
        assert [r["score"] for r in cat["per_image"]] == s.tolist()
        assert [r["label"] for r in cat["per_image"]] == y.astype(int).tolist()
        assert cat["n_good"] == 6 and cat["n_defect"] == 8
        assert cat["defect_types"] == {"crack": 2, "good": 6, "missing": 2, "scratch": 2, "stain": 2}
        roc = cat["roc"]["image"]
        assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(m["image_auroc"])
        assert cat["examples"] == example_indices(y, s, 3)
    assert data["mean"]["image_auroc"] == pytest.approx(
        np.mean([c["metrics"]["image_auroc"] for c in data["categories"]])
    )
    assert data["run"]["random_weights"] is True and data["run"]["settings"]["layers"] == ["layer2", "layer3"]


def test_random_weights_banner(tmp_path, report):
    _, results, rep = report
    import html

    assert html.escape(RANDOM_WEIGHTS_WARNING) in rep.html_path.read_text(encoding="utf-8")
    real = write_report(tmp_path, results[:1], RunInfo(settings={}, weights="imagenet (torchvision IMAGENET1K_V1)"))
    text = real.html_path.read_text(encoding="utf-8")
    assert html.escape(RANDOM_WEIGHTS_WARNING) not in text and 'class="banner"' not in text
    assert real.data["run"]["random_weights"] is False
    flagged = write_report(tmp_path / "f", results[:1], RunInfo(weights="model.pth", random_weights=True))
    assert 'class="banner"' in flagged.html_path.read_text(encoding="utf-8")


def test_example_indices():
    labels = [0, 1, 1, 0, 1, 0]
    scores = [0.9, 0.8, 0.1, 0.2, 0.8, 0.5]
    ex = example_indices(labels, scores, n=2)
    assert ex == {"highest_defects": [1, 4], "lowest_defects": [2, 1], "highest_good": [0, 5]}


def test_report_without_pixels_or_defects(tmp_path):
    only_scores = CategoryResult("plain", labels=[0, 0, 1, 1], image_scores=[0.1, 0.2, 0.3, 0.05])
    only_good = CategoryResult("good_only", labels=[0, 0], image_scores=[0.1, 0.2])
    rep = write_report(tmp_path, [only_scores, only_good])
    plain, good = rep.data["categories"]
    assert plain["metrics"]["image_auroc"] == M.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.05])
    assert plain["metrics"]["pixel_auroc"] is None and plain["roc"]["pixel"] is None
    assert good["metrics"]["image_auroc"] is None and "only good" in good["notes"][0]
    assert "good_only" in rep.html_path.read_text(encoding="utf-8")


def test_bad_report_input(tmp_path):
    with pytest.raises(ValueError, match="labels and image_scores must be 1-D of the same length"):
        CategoryResult("x", labels=[0, 1], image_scores=[0.1])
    with pytest.raises(ValueError, match="anomaly_maps must be"):
        CategoryResult("x", labels=[0, 1], image_scores=[0.1, 0.2], anomaly_maps=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="masks .* and anomaly_maps .* differ in shape"):
        CategoryResult(
            "x", labels=[0, 1], image_scores=[0.1, 0.2], anomaly_maps=np.zeros((2, 4, 4)), masks=np.zeros((2, 5, 5))
        )
    with pytest.raises(ValueError, match="image_scores must be finite"):
        CategoryResult("x", labels=[0, 1], image_scores=[0.1, np.nan])
    with pytest.raises(ValueError, match="3 paths for 2 images"):
        CategoryResult("x", labels=[0, 1], image_scores=[0.1, 0.2], paths=["a", "b", "c"])
    ok = CategoryResult("x", labels=[0, 1], image_scores=[0.1, 0.2])
    with pytest.raises(ValueError, match="names must be unique"):
        write_report(tmp_path, [ok, ok])
    with pytest.raises(ValueError, match="at least one"):
        write_report(tmp_path, [])


# ------------------------------------------------------------------------------------------ tables


class Tables(HTMLParser):
    """The page's tables as lists of rows of (text, colspan) cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, int]]]] = []
        self._cell: list[str] | None = None
        self._span = 1

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell, self._span = [], int(dict(attrs).get("colspan", 1))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(("".join(self._cell).strip(), self._span))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables(path) -> list[list[list[tuple[str, int]]]]:
    parser = Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.tables


def _texts(row) -> list[str]:
    return [text.replace("\u2011", "-").replace("\u00a0", " ") for text, _ in row]


def test_comparison_table_puts_crd_beside_each_peer(tmp_path):
    a, b = _category("cap_a", 0), _category("cap_b", 1)
    a.extra = {
        "nn": {"image_auroc": 0.91, "head_ms_per_image": 40.0},
        "padim": {"image_auroc": 0.85, "bank_mb": 3.5},
        "crd_head_ms_per_image": 0.5,
        "crd_bank_mb": 1.25,
        "warmup_seconds": 2.0,
    }
    b.extra = {"nn": {"image_auroc": 0.75, "head_ms_per_image": 30.0}, "crd_head_ms_per_image": 1.5}
    rep = write_report(tmp_path, [a, b], RunInfo(weights="random"), n_examples=0)
    text = rep.html_path.read_text(encoding="utf-8")
    assert "nn.image_auroc" not in text and "head_ms_per_image" not in text and "crd_bank_mb" not in text
    assert "CRD beside exact 1-NN, PaDiM&#x27;s rule on the same features" in text

    metrics, comparison = _tables(rep.html_path)[:2]
    # the metrics table: groups over two header rows, one row per category and the mean
    assert _texts(metrics[0]) == ["category", "image", "pixel", "test images", "time"]
    assert [span for _, span in metrics[0]] == [1, 3, 2, 2, 2]
    second = ["AUROC", "F1-max", "F1 threshold", "AUROC", "AUPRO, FPR ≤ 0.3", "good", "defective", "fit, s"]
    assert _texts(metrics[1]) == second + ["predict, ms / image"]
    m = rep.data["categories"][0]["metrics"]
    assert _texts(metrics[2])[:2] == ["cap_a", f"{m['image_auroc']:.3f}"]
    assert _texts(metrics[4])[0] == "mean" and _texts(metrics[4])[6:8] == ["", ""]  # no mean of counts

    # the comparison: per figure, CRD's own value (its metric, or extra["crd_<figure>"]) then each peer's
    assert _texts(comparison[0]) == [
        "category",
        "image AUROC",
        "scoring head, ms / image",
        "memory bank, MB",
        "warmup, s",
    ]
    assert [span for _, span in comparison[0]] == [1, 3, 2, 2, 1]
    assert _texts(comparison[1]) == ["CRD", "exact 1-NN", "PaDiM's rule", "CRD", "exact 1-NN", "CRD", "PaDiM's rule"]
    ma, mb = (c["metrics"] for c in rep.data["categories"])
    auroc_a, auroc_b = f"{ma['image_auroc']:.3f}", f"{mb['image_auroc']:.3f}"
    mean_auroc = f"{(ma['image_auroc'] + mb['image_auroc']) / 2:.3f}"
    assert _texts(comparison[2]) == ["cap_a", auroc_a, "0.910", "0.850", "0.50", "40.00", "1.2", "3.5", "2.00"]
    assert _texts(comparison[3]) == ["cap_b", auroc_b, "0.750", "–", "1.50", "30.00", "–", "–", "–"]
    assert _texts(comparison[4]) == ["mean", mean_auroc, "0.830", "0.850", "1.00", "35.00", "1.2", "3.5", "2.00"]
    # the JSON holds the same means, in the extras' nesting
    mean = rep.data["mean"]["extra"]
    assert mean["nn"] == {"image_auroc": pytest.approx(0.83), "head_ms_per_image": 35.0}
    assert mean["padim"] == {"image_auroc": 0.85, "bank_mb": 3.5} and mean["crd_head_ms_per_image"] == 1.0


def test_report_without_extras_has_no_comparison_table(tmp_path):
    a = _category("plain", 2)
    a.extra = {}
    rep = write_report(tmp_path, [a], n_examples=0)
    assert len(_tables(rep.html_path)) == 2  # metrics and settings
    assert "beside" not in rep.html_path.read_text(encoding="utf-8") and rep.data["mean"]["extra"] == {}


def test_column_names_are_readable():
    assert label("nn.image_auroc") == "image AUROC" and label("head_ms_per_image") == "scoring head, ms / image"
    assert label("warmup_seconds") == "warmup, s" and label("index_mb") == "index, MB" and label("k_value") == "k value"
    assert digits("nn.image_auroc") == 3 and digits("warmup_seconds") == 2 and digits("bank_patches") == 0
    assert header("fit, s") == "fit,\u00a0s" and header("predict, ms / image") == "predict, ms\u00a0/\u00a0image"
    assert header("F1-max <b>") == "F1\u2011max &lt;b&gt;"
