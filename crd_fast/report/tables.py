"""The report's HTML tables: metrics, the comparison with other scoring rules, settings and the label-free choice.

Every table must fit a 1200 px page (tests/test_report_browser.py measures it): columns are grouped under a first
header row (the metric, or what is measured) with short names and units in the second, so no header is wider
than its numbers; names and free text may wrap (the page's CSS), numbers never do.

The comparison table reads ``CategoryResult.extra``: a nested dict ``{peer: {metric: value}}`` is another scoring
rule measured on the same features (e.g. ``"nn"``, exact nearest-neighbour search), shown beside CRD's own value
of that metric (the category's metric of that name, or the scalar ``extra["crd_<metric>"]``); any other scalar
gets a column of its own.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..selection.record import SelectionRecord, record_rows

#: Readable names of the scoring rules in ``extra`` (unknown ones are shown by their key).
PEER_LABELS = {"nn": "exact 1-NN", "padim": "PaDiM's rule", "crd": "CRD"}
#: Readable names, with units, of the figures in ``extra`` (unknown keys are spelled out by ``label``).
METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO",
    "f1_max": "image F1-max",
    "pixel_f1": "pixel F1",
    "head_ms_per_image": "scoring head, ms / image",
    "ms_per_image": "ms / image",
    "fit_seconds": "fit, s",
    "bank_patches": "memory bank, patches",
    "bank_mb": "memory bank, MB",
}
#: Unit suffixes of keys without a label: key ending -> (readable ending, decimals).
_UNITS = (("_ms_per_image", ", ms / image", 2), ("_seconds", ", s", 2), ("_mb", ", MB", 1), ("_patches", "", 0))
#: The prefix of a scalar in ``extra`` that is CRD's own value of a peer's metric.
CRD_PREFIX = "crd_"


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell's text: numbers to ``digits`` decimals, None as a dash, text escaped."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def label(key: str) -> str:
    """The readable column name of a figure's key ("nn.image_auroc" is labelled by its last part)."""
    key = key.rsplit(".", 1)[-1]
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    for ending, text, _ in _UNITS:
        if key.endswith(ending):
            return key[: -len(ending)].replace("_", " ") + text
    return key.replace("_", " ")


def digits(key: str) -> int:
    """Decimals shown for a figure: 3 for scores in [0, 1], fewer for times and sizes."""
    key = key.rsplit(".", 1)[-1]
    if key in ("head_ms_per_image", "ms_per_image", "fit_seconds"):
        return 2
    for ending, _, n in _UNITS:
        if key.endswith(ending):
            return n
    return 3


def header(text: str) -> str:
    """A header's HTML: escaped, with its unit (after the last ", ") kept on one line and hyphens unbroken
    ("F1-max"), so a narrow column breaks its header only between words, never inside "ms / image"."""
    head, sep, unit = text.rpartition(", ")
    if sep and len(unit) <= 12:
        text = head + (",\u00a0" if len(unit) <= 2 else ", ") + unit.replace(" ", "\u00a0")
    return html.escape(text.replace("-", "\u2011"))


def _th(text: str, cls: str = "", colspan: int = 1, rowspan: int = 1) -> str:
    attrs = f' class="{cls}"' if cls else ""
    attrs += f' colspan="{colspan}"' if colspan > 1 else ""
    attrs += f' rowspan="{rowspan}"' if rowspan > 1 else ""
    return f"<th{attrs}>{text}</th>"


def _row(cells: Sequence[str], cls: str = "") -> str:
    """A body row: the first cell is a name (left, may wrap), the others numbers (right, never wrap)."""
    tds = [f'<td class="l"><div class="name">{cells[0]}</div></td>'] + [f'<td class="n">{c}</td>' for c in cells[1:]]
    opening = f'<tr class="{cls}">' if cls else "<tr>"
    return opening + "".join(tds) + "</tr>"


@dataclass(frozen=True)
class Column:
    """One numeric column: its group (first header row; "" = none), its own name, how a category's value is read,
    its decimals and whether the mean row shows its mean (not for counts or thresholds)."""

    group: str
    name: str
    value: Callable[[dict[str, Any]], Any]
    digits: int = 3
    averaged: bool = True


def grouped_table(columns: Sequence[Column], categories: Sequence[dict[str, Any]], mean: bool = True) -> str:
    """A table of one row per category (and their mean): a "category" column, then ``columns`` under two header
    rows (adjacent columns of one group share its header; a column without a group spans both rows)."""
    top = [_th("category", "l", rowspan=2)]
    second = []
    i = 0
    while i < len(columns):
        group = columns[i].group
        j = i
        while j < len(columns) and group and columns[j].group == group:
            j += 1
        if not group:
            top.append(_th(header(columns[i].name), rowspan=2))
            i += 1
            continue
        top.append(_th(header(group), "g", colspan=j - i))
        second += [_th(header(c.name)) for c in columns[i:j]]
        i = j
    rows = [f"<tr>{''.join(top)}</tr>"]
    if second:
        rows.append(f"<tr>{''.join(second)}</tr>")
    for c in categories:
        rows.append(_row([html.escape(c["name"])] + [fmt(col.value(c), col.digits) for col in columns]))
    if mean and len(categories) > 1:
        cells = ["mean"]
        for col in columns:
            values = [v for v in (col.value(c) for c in categories) if isinstance(v, (int, float, np.number))]
            cells.append(fmt(float(np.mean(values)), col.digits) if values and col.averaged else "")
        rows.append(_row(cells, "mean"))
    return "<table>" + "".join(rows) + "</table>"


def _metric(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda c: c["metrics"].get(key)


def metrics_table(categories: Sequence[dict[str, Any]], fpr_limit: float) -> str:
    """CRD's figures per category: image and pixel metrics (AUPRO integrated up to the false positive rate
    ``fpr_limit``; pixel F1 where a pixel threshold was set), the test set, the fit's and predict's times."""
    has_pixel_f1 = any(c["metrics"].get("pixel_f1") is not None for c in categories)
    columns = [
        Column("image", "AUROC", _metric("image_auroc")),
        Column("image", "F1-max", _metric("f1_max")),
        Column("image", "F1 threshold", _metric("f1_threshold"), 4, averaged=False),
        Column("pixel", "AUROC", _metric("pixel_auroc")),
        Column("pixel", f"AUPRO, FPR ≤ {fpr_limit:g}", _metric("aupro")),
    ]
    if has_pixel_f1:
        columns.append(Column("pixel", "F1", _metric("pixel_f1")))
    columns += [
        Column("test images", "good", lambda c: c["n_good"], 0, averaged=False),
        Column("test images", "defective", lambda c: c["n_defect"], 0, averaged=False),
        Column("time", "fit, s", _metric("fit_seconds"), 2),
        Column("time", "predict, ms / image", _metric("ms_per_image"), 1),
    ]
    return grouped_table(columns, categories)


def _flat(extra: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in extra.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat(v).items()})
        else:
            out[k] = v
    return out


def comparison_columns(categories: Sequence[dict[str, Any]]) -> list[Column]:
    """The comparison table's columns from the categories' ``extra`` (see the module docstring); [] if none."""
    peers: list[str] = []
    metrics: list[str] = []
    scalars: list[str] = []
    for c in categories:
        for k, v in c["extra"].items():
            if isinstance(v, dict):
                peers += [k] if k not in peers else []
                metrics += [m for m in _flat(v) if m not in metrics]
            elif k not in scalars:
                scalars.append(k)

    def own(m: str) -> Callable[[dict[str, Any]], Any]:
        return lambda c: c["metrics"].get(m) if c["metrics"].get(m) is not None else c["extra"].get(CRD_PREFIX + m)

    def peer(p: str, m: str) -> Callable[[dict[str, Any]], Any]:
        return lambda c: _flat(c["extra"]).get(f"{p}.{m}")

    columns: list[Column] = []
    for m in metrics:
        if any(own(m)(c) is not None for c in categories):
            columns.append(Column(label(m), "CRD", own(m), digits(m)))
        for p in peers:
            if any(peer(p, m)(c) is not None for c in categories):
                columns.append(Column(label(m), PEER_LABELS.get(p, p), peer(p, m), digits(m)))
    used = {CRD_PREFIX + m for m in metrics}
    for k in scalars:
        if k not in used:
            columns.append(Column("", label(k), lambda c, k=k: c["extra"].get(k), digits(k)))
    return columns


def comparison_table(categories: Sequence[dict[str, Any]]) -> Optional[str]:
    """CRD beside the other scoring rules of ``extra`` per figure, or None when no category has extra figures."""
    columns = comparison_columns(categories)
    return grouped_table(columns, categories) if columns else None


def peer_names(categories: Sequence[dict[str, Any]]) -> list[str]:
    """The readable names of the other scoring rules in the categories' ``extra``."""
    names: list[str] = []
    for c in categories:
        for k, v in c["extra"].items():
            if isinstance(v, dict) and PEER_LABELS.get(k, k) not in names:
                names.append(PEER_LABELS.get(k, k))
    return names


def settings_table(run: dict[str, Any]) -> str:
    """The run's weights, command and settings, one per row."""
    rows = [f'<tr><th class="l">weights</th><td class="l">{html.escape(str(run["weights"]))}</td></tr>']
    if run.get("command"):
        rows.append(f'<tr><th class="l">command</th><td class="l"><code>{html.escape(run["command"])}</code></td></tr>')
    for k, v in run["settings"].items():
        text = v if isinstance(v, str) else json.dumps(v)
        rows.append(f'<tr><th class="l">{html.escape(str(k))}</th><td class="l">{html.escape(text)}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def selection_table(record: dict[str, Any]) -> str:
    """The label-free choice's curves: per lam_rel and spatial model the held-out likelihood and the pseudo-defect
    criterion; ``<`` marks each model's likelihood minimiser lam0, ``*`` the choice."""
    choice = record.get("choice", {})
    families = record.get("families") or {}
    top = [_th("lam_rel", "l", rowspan=2)] + [_th(header(f"{f} model"), "g", colspan=2) for f in families]
    second = [_th(header("held-out nll")) + _th(header("pseudo-defect AUROC")) for _ in families]
    rows = [f"<tr>{''.join(top)}</tr>", f"<tr>{''.join(second)}</tr>"]
    for g, cells_by_family in record_rows(SelectionRecord.from_dict(record)):
        cells = [f"{g:g}"]
        for fam, (nll, crit) in cells_by_family.items():
            mark = " *" if fam == choice.get("spatial") and g == choice.get("lam_rel") else ""
            lam0 = " &lt;" if families[fam].get("lam0") == g else ""
            cells += [f"{fmt(nll, 4)}{lam0}", f"{fmt(crit, 4)}{mark}"]
        rows.append(_row(cells))
    return "<table>" + "".join(rows) + "</table>"


__all__ = [
    "CRD_PREFIX",
    "METRIC_LABELS",
    "PEER_LABELS",
    "Column",
    "comparison_columns",
    "comparison_table",
    "digits",
    "fmt",
    "grouped_table",
    "label",
    "metrics_table",
    "peer_names",
    "selection_table",
    "settings_table",
]
