"""The ratio table: every path measured in one run, as multiples of the fused head, shares and fit scaling.

Results are keyed ``head/<embedding>/<path>`` (path "fused", "reference" or ``nn_name(backend, fraction)``)
and ``e2e/<path>`` ("backbone", "head", "full"); the suites in bench/suites/ and ``crd-fast bench`` key them alike.
"""

from __future__ import annotations

from typing import Any, Optional

from .config import BANK_FRACTIONS, SCORE_RTOL
from .machine import describe_machine
from .timing import Timing

Results = dict[str, Timing]


def head_key(embedding: str, path: str) -> str:
    """Result key of a head path: ``head/<embedding>/<path>``, path e.g. "fused" or "nn-faiss-100%"."""
    return f"head/{embedding}/{path}"


def nn_name(backend: str, fraction: float) -> str:
    return f"nn-{backend}-{fraction * 100:g}%"


def format_table(
    results: Results, info: Optional[dict[str, Any]] = None, extra: Optional[dict[str, Any]] = None
) -> str:
    """The ratio table: head paths vs the fused head, end-to-end shares, fit scaling.

    ``results`` maps keys (``head/<embedding>/<path>``, ``e2e/<path>``) to ``Timing``s;
    ``extra`` may hold "config" (a line describing the sizes), "head_sizes" ({embedding: (n_query_images,
    n_bank_patches, d)}), "e2e" (dict with backbone, crop, batch), "fit" (list of ``fit_run`` dicts) and
    "errors" ({embedding: max relative difference of fused vs reference scores}).
    """
    extra = extra or {}
    lines: list[str] = []
    if info:
        lines.append("machine: " + describe_machine(info))
    if extra.get("config"):
        lines.append("sizes: " + extra["config"])
    for emb in dict.fromkeys(key.split("/")[1] for key in results if key.startswith("head/")):
        fused = results.get(head_key(emb, "fused"))
        if fused is None:
            continue
        sizes = extra.get("head_sizes", {}).get(emb)
        what = f" d={sizes[2]}, {sizes[0]} query images, NN bank of {sizes[1]:,} patches at 100%" if sizes else ""
        lines.append("")
        lines.append(f"CRD head, {emb} embedding,{what}")
        lines.append(
            f"  {'path':<18}{'best ms':>10}{'median ms':>11}{'rounds':>7}{'x fused (best)':>16}{'(median)':>10}"
        )
        paths = ["fused", "reference"] + [nn_name(b, f) for f in BANK_FRACTIONS for b in ("faiss", "torch")]
        for path in paths:
            t = results.get(head_key(emb, path))
            if t is not None:
                lines.append(
                    f"  {path:<18}{t.best * 1e3:10.1f}{t.median * 1e3:11.1f}{t.rounds:7d}"
                    f"{t.best / fused.best:16.1f}{t.median / fused.median:10.1f}"
                )
        err = extra.get("errors", {}).get(emb)
        if err is not None:
            lines.append(f"  fused vs reference scores: max relative difference {err:.2e} (tolerance {SCORE_RTOL:g})")
    full = results.get("e2e/full")
    if full is not None:
        e2e = extra.get("e2e", {})
        batch = e2e.get("batch", 1)
        lines.append("")
        lines.append(
            f"End to end: {e2e.get('backbone', '?')} (random weights), {e2e.get('crop', '?')} px, "
            f"batch {batch}, paths timed round-robin"
        )
        lines.append(
            f"  {'path':<18}{'images/s (best)':>16}{'(median)':>10}{'share of full (best)':>22}{'(median)':>10}"
        )
        for name in ("backbone", "head", "full"):
            t = results.get(f"e2e/{name}")
            if t is not None:
                lines.append(
                    f"  {name:<18}{batch / t.best:16.2f}{batch / t.median:10.2f}"
                    f"{t.best / full.best * 100:21.1f}%{t.median / full.median * 100:9.1f}%"
                )
        backbone = results.get("e2e/backbone")
        if backbone is not None:
            best = (full.best - backbone.best) / full.best * 100
            median = (full.median - backbone.median) / full.median * 100
            lines.append(
                f"  after the backbone (head + anomaly map + max): {best:.1f}% of full (best), {median:.1f}% (median)"
            )
    fits = extra.get("fit")
    if fits:
        lines.append("")
        lines.append(f"Fit (CRDScorer.partial_fit, d={fits[0]['dim']}, one process per size; peak RSS = VmHWM)")
        lines.append(
            f"  {'images':>7}{'patches':>11}{'patches/s':>12}{'solve s':>9}{'peak RSS MB':>13}"
            f"{'fit adds MB':>13}{'NN bank MB':>12}"
        )
        for f in fits:
            solve = f.get("solve_s", float("nan"))
            lines.append(
                f"  {f['n_images']:>7}{f['n_patches']:>11,}{f['patches_per_s']:>12,.0f}{solve:>9.1f}"
                f"{f['peak_rss_mb']:>13.0f}{f['peak_rss_mb'] - f['rss_before_mb']:>13.0f}"
                f"{f['nn_bank_mb']:>12.0f}"
            )
    return "\n".join(lines)
