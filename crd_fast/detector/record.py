"""The label-free choice's record (``CRDDetector.selection``) as rows and text: torch-free, for the CLI and reports.

The record is written by crd_fast/detector/selection.py; what it holds: docs/DESIGN.md "The detector's choice of
spatial model and lam_rel".
"""

from __future__ import annotations

from typing import Any, Optional

#: The spatial families, in the order tables show them.
FAMILY_ORDER = ("global", "local")


def record_rows(record: dict[str, Any]) -> list[tuple[float, dict[str, tuple[Optional[float], Optional[float]]]]]:
    """The record's curves by lam_rel: [(lam_rel, {family: (nll, pseudo-defect criterion)})], None where a curve
    was not evaluated (records written before the likelihood have no nll)."""
    grid = list(record.get("grid") or [])
    families = record.get("families") or {}
    rows = []
    for i, lam in enumerate(grid):
        cells = {f: ((rec.get("nll") or [None] * len(grid))[i], rec["curve"][i]) for f, rec in families.items()}
        rows.append((lam, cells))
    return rows


def selection_table(record: dict[str, Any]) -> list[str]:
    """The record as text lines: one row per lam_rel; per family the held-out negative log-likelihood (nll) and
    the pseudo-defect criterion (crit). ``*`` marks the choice, ``<`` each family's likelihood minimiser lam0."""
    families = [f for f in FAMILY_ORDER if f in record.get("families", {})]
    if not families or not record.get("grid"):
        return []
    head = f"    {'lam_rel':>8} | " + " | ".join(f"{f + ' nll':>11} {'crit':>7} " for f in families)
    lines = [head]
    choice = record["choice"]
    for lam, cells_by_family in record_rows(record):
        cells = []
        for f in families:
            nll, crit = cells_by_family[f]
            lam0 = "<" if record["families"][f].get("lam0") == lam else " "
            mark = "*" if (f == choice["spatial"] and lam == choice["lam_rel"]) else " "
            nll_text = "-" if nll is None else format(nll, ".4f")
            crit_text = "-" if crit is None else format(crit, ".4f")
            cells.append(f"{nll_text:>10}{lam0} {crit_text:>7}{mark}")
        lines.append(f"    {lam:>8g} | " + " | ".join(cells))
    return lines
