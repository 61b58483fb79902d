"""Build the report's figures (JSON) and page (self-contained HTML) and write both atomically."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .._version import __version__
from ..evaluation.results import CategoryResult, example_indices
from ..io.atomic import atomic_write_many
from ..io.safety import check_outputs
from ..metrics import scores as M
from ..metrics.pixels import pixel_f1
from .figures import curves_png, map_range, overlay_tile, selection_png
from .run_info import RunInfo
from .tables import PEER_LABELS, comparison_table, fmt, metrics_table, peer_names, selection_table, settings_table

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1")
EXAMPLE_TITLES = {
    "highest_defects": "Highest-scoring defective images (found most clearly)",
    "lowest_defects": "Lowest-scoring defective images (missed first)",
    "highest_good": "Highest-scoring good images (false alarms first)",
}
RANDOM_WEIGHTS_WARNING = (
    "The backbone's weights were RANDOM (seeded, untrained). These numbers show that the pipeline runs "
    "end to end; they say nothing about the detector's accuracy with real (e.g. ImageNet) weights."
)


@dataclass
class Report:
    """Where the report went, and its figures (the JSON document as a dict)."""

    html_path: Path
    json_path: Path
    data: dict[str, Any]


def category_figures(
    result: CategoryResult, fpr_limit: float = 0.3, n_examples: int = 4, max_points: int = 512
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON figures of one category and its curves (for plotting), via :mod:`crd_fast.metrics.scores`."""
    y, s = result.labels, result.image_scores
    notes: list[str] = []
    metrics: dict[str, Any] = {
        "image_auroc": None,
        "f1_max": None,
        "f1_threshold": None,
        "pixel_auroc": None,
        "aupro": None,
    }
    curves: dict[str, Any] = {"image_roc": None, "pixel_roc": None, "pro": None}
    if y.any() and not y.all():
        have_pixels = result.masks is not None and result.anomaly_maps is not None and result.masks.any()
        out = M.evaluate(
            y,
            s,
            result.masks if have_pixels else None,
            result.anomaly_maps if have_pixels else None,
            fpr_limit=fpr_limit,
            curves=True,
            max_points=max_points,
        )
        curves = out.pop("curves")
        metrics.update(out)
        curves["image_roc_peers"] = {
            PEER_LABELS.get(peer, peer): M.roc_points(y, scores, max_points)
            for peer, scores in (result.peer_scores or {}).items()
        }
        if not have_pixels:
            notes.append(
                "no pixel metrics: " + ("no anomaly maps" if result.anomaly_maps is None else "no ground-truth masks")
            )
    else:
        notes.append(
            "image metrics need both good and defective test images; this category has only "
            + ("defective" if y.all() else "good")
            + " ones"
        )
    metrics["pixel_threshold"] = result.pixel_threshold
    pred_masks = result.pred_masks
    metrics["pixel_f1"] = (
        pixel_f1(pred_masks, result.masks)
        if pred_masks is not None and result.masks is not None and result.masks.any()
        else None
    )
    metrics["fit_seconds"] = result.fit_seconds
    metrics["ms_per_image"] = result.ms_per_image
    types, counts = np.unique(result.defect_types, return_counts=True)
    figures = {
        "name": result.name,
        "n_images": result.n_images,
        "n_good": int((~y).sum()),
        "n_defect": int(y.sum()),
        "defect_types": {str(t): int(c) for t, c in zip(types, counts)},
        "metrics": metrics,
        "extra": result.extra,
        "notes": notes,
        "roc": {"image": curves["image_roc"], "pixel": curves["pixel_roc"]},
        "pro_curve": curves["pro"],
        "examples": example_indices(y, s, n_examples),
        "selection": result.selection,
        "per_image": [
            {"path": p, "label": int(lab), "defect_type": t, "score": float(sc)}
            for p, lab, t, sc in zip(result.paths, y, result.defect_types, s)
        ],
    }
    return figures, curves


def _mean(values: Sequence[Any]) -> Optional[float]:
    numbers = [v for v in values if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]
    return float(np.mean(numbers)) if numbers else None


def _mean_metrics(categories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean over the categories of each metric and (under "extra", the same nesting) of each extra figure."""
    out: dict[str, Any] = {
        key: _mean([c["metrics"].get(key) for c in categories]) for key in METRIC_KEYS + ("fit_seconds", "ms_per_image")
    }

    def mean_of(dicts: list[dict[str, Any]]) -> dict[str, Any]:
        keys = list(dict.fromkeys(k for d in dicts for k in d))
        return {
            k: mean_of([d[k] for d in dicts if isinstance(d.get(k), dict)])
            if any(isinstance(d.get(k), dict) for d in dicts)
            else _mean([d.get(k) for d in dicts])
            for k in keys
        }

    out["extra"] = mean_of([c["extra"] for c in categories])
    return out


def _jsonable(x: Any) -> Any:
    """Numpy scalars/arrays to Python, NaN/Inf to None: the JSON file must be strict JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_report(
    out_dir: PathLike,
    results: Sequence[CategoryResult],
    run: Optional[RunInfo] = None,
    n_examples: int = 4,
    fpr_limit: float = 0.3,
) -> Report:
    """Write ``out_dir/report.html`` (self-contained: images inlined) and ``out_dir/report.json``.

    The page shows a metrics table per category (and the mean), the run's settings, ROC and PRO curves,
    and for each category a grid of heatmap overlays: the highest- and lowest-scoring defective images
    and the highest-scoring good images (``n_examples`` each). With random backbone weights it opens with
    a banner saying so. Both files are written atomically; the JSON holds the same figures as the page.
    """
    if isinstance(results, CategoryResult):
        results = [results]
    if not results:
        raise ValueError("write_report needs at least one CategoryResult")
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"category names must be unique, got {names}")
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    run = run or RunInfo()
    out = Path(out_dir)
    check_outputs(files=[out / "report.json", out / "report.html"])  # before any work (crd_fast.io.safety)
    out.mkdir(parents=True, exist_ok=True)

    categories, sections = [], []
    for result in results:
        figures, curves = category_figures(result, fpr_limit=fpr_limit, n_examples=n_examples)
        categories.append(figures)
        sections.append(_category_section(result, figures, curves))

    data = _jsonable(
        {
            "title": run.title,
            "crd_fast_version": __version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "run": {
                "settings": run.settings,
                "weights": run.weights,
                "random_weights": run.random_weights,
                "command": run.command,
                "notes": run.notes,
            },
            "fpr_limit": fpr_limit,
            "categories": categories,
            "mean": _mean_metrics(categories),
        }
    )
    html_text = _page(run, data, sections)
    json_path, html_path = out / "report.json", out / "report.html"
    with atomic_write_many([json_path, html_path]) as (json_tmp, html_tmp):  # one commit: never a mixed pair
        json_tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        html_tmp.write_text(html_text, encoding="utf-8")
    logger.info("wrote report %s (%d categories)", html_path, len(categories))
    return Report(html_path=html_path, json_path=json_path, data=data)


# ------------------------------------------------------------------------------------------- HTML

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;padding:0 24px;
color:#222;max-width:1200px;overflow-wrap:anywhere}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:1.05em;margin:18px 0 6px}
img{max-width:100%;height:auto}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.92em;max-width:100%}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top} th{vertical-align:bottom}
th{background:#f2f2f2;overflow-wrap:normal;font-weight:600} th.g{text-align:center}
td.n{white-space:nowrap} td.l,th.l{text-align:left} .name{max-width:16em} tr.mean td{font-weight:600;background:#fafafa}
.banner{background:#b00020;color:#fff;padding:14px 18px;border-radius:6px;font-size:1.05em;margin:12px 0}
.note{color:#666;font-size:0.9em}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;font-size:0.82em;max-width:460px} figure img{display:block;border:1px solid #ddd}
figcaption{margin-top:3px;word-break:break-all}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _category_section(result: CategoryResult, figures: dict[str, Any], curves: dict[str, Any]) -> str:
    parts = [f'<h2 id="cat-{html.escape(result.name)}">{html.escape(result.name)}</h2>']
    types = ", ".join(f"{html.escape(t)}: {n}" for t, n in figures["defect_types"].items())
    parts.append(f'<p class="note">{figures["n_images"]} test images ({types})</p>')
    for note in figures["notes"]:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if curves.get("image_roc") is not None:
        parts.append(_img(curves_png(result.name, curves, figures["metrics"]), f"{result.name} curves"))
    if result.selection:
        parts.append(_selection_section(result.name, result.selection))
    maps, masks, pred_masks = result.anomaly_maps, result.masks, result.pred_masks
    vmin, vmax = map_range(maps, result.labels) if maps is not None else (0.0, 1.0)
    if maps is not None:
        parts.append(
            f'<p class="note">Heatmap colours span anomaly-map values {vmin:.4g} (median of the good images) '
            f"to {vmax:.4g} (the maximum), the same for every image of this category; "
            "ground truth outlined in white.</p>"
        )
    if pred_masks is not None:
        f1 = figures["metrics"]["pixel_f1"]
        parts.append(
            f'<p class="note">Predicted defect regions (anomaly map &ge; pixel threshold '
            f"{result.pixel_threshold:.4g}) outlined in magenta"
            + (f"; pixel F1 over all test images {f1:.3f}." if f1 is not None else ".")
            + "</p>"
        )
    for group, indices in figures["examples"].items():
        if not indices:
            continue
        tiles = []
        for i in indices:
            png = overlay_tile(
                result.image(i),
                None if maps is None else maps[i],
                None if masks is None else masks[i],
                vmin,
                vmax,
                None if pred_masks is None else pred_masks[i],
            )
            caption = (
                f"{html.escape(result.defect_types[i])} · score {result.image_scores[i]:.4g}<br>"
                f"{html.escape(result.paths[i])}"
            )
            body = _img(png, result.paths[i]) if png is not None else '<p class="note">(no image or map kept)</p>'
            tiles.append(f"<figure>{body}<figcaption>{caption}</figcaption></figure>")
        parts.append(f'<h3>{EXAMPLE_TITLES[group]}</h3><div class="grid">{"".join(tiles)}</div>')
    return "\n".join(parts)


def _selection_section(name: str, record: dict[str, Any]) -> str:
    """The label-free choice: what was chosen, why, and the validation curve per spatial model (plot and table)."""
    choice = record.get("choice", {})
    lam = choice.get("lam_rel")
    lam_text = "–" if lam is None else format(lam, "g")
    parts = [
        "<h3>Label-free choice of the model</h3>",
        f'<p class="note">spatial model <b>{html.escape(str(choice.get("spatial")))}</b>, lam_rel <b>{lam_text}</b>'
        f" ({html.escape(str(record.get('reason', '')))}; {record.get('held_out', 0)} of "
        f"{record.get('n_images', '?')} training images held out with pseudo-defects, "
        f"{fmt(record.get('seconds'), 3)} s of a {fmt(record.get('fit_seconds'), 3)} s fit)</p>",
    ]
    families = record.get("families") or {}
    grid = record.get("grid") or []
    if not families or not grid:
        return "\n".join(parts)
    parts.append(_img(selection_png(name, record), f"{name} label-free choice"))
    parts.append(
        '<p class="note">held-out nll: negative Gaussian log-likelihood per dimension of the clean held-out patches '
        "(lowest = the spatial model and lam0, marked &lt;); pseudo-defect AUROC: image AUROC of the held-out "
        "images with pseudo-defects against the clean ones, which chooses lam_rel at or above lam0 (* = chosen)</p>"
        + selection_table(record)
    )
    return "\n".join(parts)


def _comparison(categories: Sequence[dict[str, Any]]) -> str:
    """The extra figures (other scoring rules on the same features) as their own table, or nothing."""
    table = comparison_table(categories)
    if table is None:
        return ""
    peers = peer_names(categories)
    title = f"CRD beside {', '.join(peers)} on the same features" if peers else "Further figures"
    return f"<h3>{html.escape(title)}</h3>\n{table}"


def _page(run: RunInfo, data: dict[str, Any], sections: list[str]) -> str:
    banner = f'<div class="banner">⚠ {html.escape(RANDOM_WEIGHTS_WARNING)}</div>' if run.random_weights else ""
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in run.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run.title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(run.title)}</h1>
<p class="note">crd-fast {html.escape(__version__)} · {html.escape(data["created_utc"])} ·
image score = max of the patch scores; AUPRO integrated to FPR {data["fpr_limit"]:g} (MVTec AD definition);
pixel F1 at the pixel threshold; times on this run's machine (fit: the whole fit; predict: end to end, per image)</p>
{banner}{notes}
<h2>Metrics</h2>
{metrics_table(data["categories"], data["fpr_limit"])}
{_comparison(data["categories"])}
<h2>Settings</h2>
{settings_table(data["run"])}
{"".join(sections)}
</body></html>
"""
