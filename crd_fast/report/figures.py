"""Pictures for the report: curve plots (matplotlib, Agg, no pyplot state) and overlay tiles, as PNG bytes."""

from __future__ import annotations

import io
import textwrap
from typing import Any, Optional

import numpy as np

from .overlay import PRED_COLOR, colorize, draw_contour, heatmap_overlay, normalize_map, png_bytes, to_rgb_uint8

#: Most lines a category name takes in a plot's title (longer names end with an ellipsis).
TITLE_LINES = 2


def wrapped_title(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` wrapped to fit ``width_inches`` at ``fontsize`` points (long words are broken), at most
    TITLE_LINES lines: a long category name must not run past its plot."""
    chars = max(12, int(width_inches * 72 / (0.62 * fontsize)))  # a generous average glyph width
    return "\n".join(textwrap.wrap(text, chars, max_lines=TITLE_LINES, placeholder=" …")) or text


def curves_png(name: str, curves: dict[str, Any], metrics: dict[str, Any]) -> bytes:
    """One row of plots for a category: image ROC, pixel ROC and the PRO curve (where available)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("image_roc", "Image ROC", "image_auroc", "AUROC")]
    if curves.get("pixel_roc") is not None:
        panels.append(("pixel_roc", "Pixel ROC", "pixel_auroc", "AUROC"))
    if curves.get("pro") is not None:
        panels.append(("pro", "PRO curve", "aupro", "AUPRO"))
    fig = Figure(figsize=(3.6 * len(panels), 3.6), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(wrapped_title(name, 3.6 * len(panels), 10), fontsize=10)
    for k, (key, title, metric, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        curve = curves[key]
        if key == "pro":
            limit = curve["fpr_limit"]
            fpr, pro = np.asarray(curve["fpr"]), np.asarray(curve["pro"])
            ax.plot(fpr, pro, color="tab:green", lw=1.8)
            ax.axvline(limit, color="grey", ls=":", lw=1)
            ax.set_xlim(0, min(1.0, 2 * limit))
            ax.set_ylabel("per-region overlap")
        else:
            peers = curves.get("image_roc_peers") or {} if key == "image_roc" else {}
            ax.plot(curve["fpr"], curve["tpr"], color="tab:blue", lw=1.8, label=f"CRD ({curve['auc']:.3f})")
            for (peer, points), color in zip(peers.items(), ("tab:orange", "tab:purple", "tab:brown")):
                ax.plot(points["fpr"], points["tpr"], color=color, lw=1.2, label=f"{peer} ({points['auc']:.3f})")
            if peers:
                ax.legend(fontsize=7, loc="lower right")
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
            ax.set_xlim(0, 1)
            ax.set_ylabel("true positive rate")
        value = metrics.get(metric)
        ax.set_title(f"{title}\n{label} {value:.3f}" if value is not None else title, fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def selection_png(name: str, record: dict[str, Any]) -> bytes:
    """The label-free choice: held-out likelihood (left) and pseudo-defect criterion (right) against lam_rel,
    one line per spatial model, the choice starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.6, 3.2), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    choice = record["choice"]
    panels = (("nll", "held-out negative log-likelihood"), ("curve", "pseudo-defect image AUROC"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        grid = list(record["grid"])
        for family, rec in record["families"].items():
            values = rec.get(key) or [None] * len(grid)
            curve = np.asarray([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(grid, curve, marker="o", ms=3, lw=1.5, label=family)
        chosen = record["families"].get(choice["spatial"])
        if chosen is not None and chosen.get(key) and choice["lam_rel"] in grid:
            value = chosen[key][grid.index(choice["lam_rel"])]
            if value is not None:
                ax.plot([choice["lam_rel"]], [value], marker="*", ms=12, color="black", ls="none", label="chosen")
        ax.set_xscale("log")
        ax.set_xlabel("lam_rel")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(wrapped_title(f"{name}: label-free choice (held-out images)", 7.6, 9), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def map_range(anomaly_maps: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Colour range shared by a category's overlays: from the median pixel of the good images' maps to the max.

    The median of normal pixels maps to the bottom of the colour scale, so a normal image looks calm and
    colours are comparable between images.
    """
    normal = anomaly_maps[~labels] if (~labels).any() else anomaly_maps
    sample = normal.reshape(-1)[:: max(1, normal.size // 2_000_000)]  # a subsample is plenty for a median
    lo, hi = float(np.median(sample)), float(anomaly_maps.max())
    return (lo, hi) if hi > lo else (float(anomaly_maps.min()), hi)


def overlay_tile(
    image: Optional[np.ndarray],
    anomaly_map: Optional[np.ndarray],
    mask: Optional[np.ndarray],
    vmin: float,
    vmax: float,
    pred_mask: Optional[np.ndarray] = None,
) -> Optional[bytes]:
    """PNG of [image | heatmap overlay with the mask (white) and predicted mask (magenta) outlined], or what of
    it is available."""
    parts = []
    if image is not None:
        parts.append(to_rgb_uint8(image))
    if anomaly_map is not None:
        if image is not None:
            over = heatmap_overlay(image, anomaly_map, vmin=vmin, vmax=vmax, alpha=0.5, mask=mask, pred_mask=pred_mask)
        else:
            over = colorize(normalize_map(anomaly_map, vmin, vmax))
            for m, color in ((mask, (255, 255, 255)), (pred_mask, PRED_COLOR)):
                if m is not None:
                    draw_contour(over, m, color)
        parts.append(over)
    elif image is not None and mask is not None:
        parts.append(heatmap_overlay(image, np.zeros(mask.shape), vmin=0, vmax=1, alpha=0.0, mask=mask))
    if not parts:
        return None
    height = max(p.shape[0] for p in parts)
    gap = np.full((height, 4, 3), 255, dtype=np.uint8)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in parts]
    row = [padded[0]]
    for p in padded[1:]:
        row += [gap, p]
    return png_bytes(np.concatenate(row, axis=1))
