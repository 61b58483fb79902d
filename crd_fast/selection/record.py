"""The label-free choice's record (``CRDDetector.selection``): what was chosen, the evidence, the curves, the cost.

Torch-free, for the command line and reports. :class:`SelectionRecord` holds the facts only; the sentences that
explain them (:meth:`SelectionRecord.reason`, :func:`selection_table`) are formed here, where they are shown. Its
``to_dict`` form is what model files and report.json store (docs/DESIGN.md "The detector's choice of spatial model
and lam_rel"); ``from_dict`` reads it back, including records written by earlier versions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .plan import fallback_reason

#: The spatial models in the order tables show them (others follow in the order the record lists them).
FAMILY_ORDER = ("global", "local")
_CHOICE_KEYS = ("spatial", "lam_rel")


def _floats_or_none(values: Sequence[Any]) -> list[Optional[float]]:
    return [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]


@dataclass
class FamilyCurves:
    """One candidate model's curves over the lam_rel grid (None where a value was not evaluated).

    ``nll``: mean negative log-likelihood of the clean held-out patches per dimension, ``nll_se``: the standard error
    of each point's paired difference from lam0 (the likelihood's minimiser); ``window``: the grid values the
    pseudo-defects searched; ``image_auroc``, ``aupro``, ``curve``: the pseudo-defects' image AUROC, AUPRO and the
    criterion (evaluated for the chosen model only); ``lam_rel``: the choice, for the chosen model.
    """

    nll: list[Optional[float]]
    nll_se: list[Optional[float]]
    lam0: float
    window: list[float]
    seconds: float = 0.0
    image_auroc: list[Optional[float]] = field(default_factory=list)
    aupro: list[Optional[float]] = field(default_factory=list)
    curve: list[Optional[float]] = field(default_factory=list)
    lam_rel: Optional[float] = None
    window_best_auroc: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["window_best_auroc"] is None:
            del out["window_best_auroc"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], grid_size: int) -> "FamilyCurves":
        empty = [None] * grid_size
        return cls(
            nll=_floats_or_none(data.get("nll") or empty),
            nll_se=_floats_or_none(data.get("nll_se") or empty),
            lam0=float(data["lam0"]) if data.get("lam0") is not None else math.nan,
            window=[float(v) for v in data.get("window") or []],
            seconds=float(data.get("seconds") or 0.0),
            image_auroc=_floats_or_none(data.get("image_auroc") or empty),
            aupro=_floats_or_none(data.get("aupro") or empty),
            curve=_floats_or_none(data.get("curve") or empty),
            lam_rel=None if data.get("lam_rel") is None else float(data["lam_rel"]),
            window_best_auroc=None if data.get("window_best_auroc") is None else float(data["window_best_auroc"]),
        )


@dataclass
class SelectionRecord:
    """What the label-free choice (lam_rel and/or spatial "auto") chose and why.

    ``asked``: the options as given; ``spatial``, ``lam_rel``: the choice; ``n_images``, ``held_out``: training
    images and how many were held out. A selection made: ``grid``, ``families`` (curves per candidate model),
    ``paired_likelihood`` (the comparison that chose the spatial model; None with one candidate), ``evidence`` (the
    pseudo-defects' best lam_rel against the default, paired, and where the best replaced it the ``settled`` step:
    the lam_rel taken, its difference and standard error from the best), ``criterion``, ``pseudo_strength`` (the
    faint kinds' strength), ``pseudo_defects`` (kinds painted), ``pseudo_designs`` (each design pooled: name,
    kinds, strength, images; empty in records of versions that painted one design). None made: ``fallback`` says
    why (too few images). Seconds: ``pseudo_defect_seconds`` (painting and embedding them), ``model_seconds``
    (building the candidate models), ``seconds`` (the whole choice), ``fit_seconds`` (the whole fit).
    """

    asked: dict[str, Any]
    spatial: str
    lam_rel: Optional[float]
    n_images: int
    held_out: int = 0
    grid: list[float] = field(default_factory=list)
    families: dict[str, FamilyCurves] = field(default_factory=dict)
    paired_likelihood: Optional[dict[str, Any]] = None
    evidence: Optional[dict[str, Any]] = None
    criterion: Optional[str] = None
    pseudo_strength: Optional[float] = None
    pseudo_defects: list[str] = field(default_factory=list)
    pseudo_designs: list[dict[str, Any]] = field(default_factory=list)
    fallback: Optional[str] = None
    pseudo_defect_seconds: Optional[float] = None
    model_seconds: Optional[float] = None
    seconds: float = 0.0
    fit_seconds: Optional[float] = None
    #: The reason text a record from an older version stored (shown when its facts are too few to say it anew).
    stored_reason: Optional[str] = field(default=None, compare=False)

    @classmethod
    def without_selection(
        cls, asked: Mapping[str, Any], spatial: str, lam_rel: Optional[float], n_images: int, held_out: int = 0
    ) -> "SelectionRecord":
        """The record when no selection could be made (the defaults apply); ``fallback`` says why."""
        why = fallback_reason(n_images, held_out) or f"{n_images} training images: no selection asked here"
        return cls(dict(asked), spatial, lam_rel, n_images, held_out, fallback=why)

    @property
    def made(self) -> bool:
        """Whether a selection was made (else the defaults applied)."""
        return bool(self.families) and bool(self.grid)

    # ---- text -------------------------------------------------------------------------------------
    def reason(self) -> str:
        """One sentence: what was chosen and why."""
        lam = "-" if self.lam_rel is None else f"{self.lam_rel:g}"
        if not self.made:
            if self.fallback is None and self.stored_reason:
                return self.stored_reason
            return f"{self.fallback or 'no selection'}; spatial {self.spatial!r}, lam_rel {lam}"
        chosen = self.families.get(self.spatial)
        if self.evidence is None or chosen is None:
            return self.stored_reason or f"label-free selection: spatial {self.spatial!r}, lam_rel {lam}"
        return (
            f"label-free selection: spatial {self.spatial!r} ({self._family_reason()}), lam0 {chosen.lam0:g} (its "
            f"likelihood's minimiser), lam_rel {lam}, {self._lam_reason(chosen)}"
        )

    def _family_reason(self) -> str:
        paired = self.paired_likelihood
        if not paired:
            return "the only family open"
        model, against = paired.get("model", "local"), paired.get("against", "global")
        margin = paired.get("standard_errors_needed", 2.0)
        return (
            f"held-out likelihood, {model} - {against} {paired['mean_difference']:+.4f} per dimension, "
            f"{paired['t']:+.1f} standard errors; {model} needs < -{margin:g}"
        )

    def _designs(self) -> str:
        """The pooled designs in words ("x4 + like2"), or "" for a record of one design."""
        return " + ".join(str(d.get("name", "?")) for d in self.pseudo_designs)

    def _lam_reason(self, chosen: FamilyCurves) -> str:
        ev = self.evidence or {}
        window = chosen.window
        span = f"[{window[0]:g}, {window[-1]:g}]" if window else "[]"
        needed = ev.get("deviations_needed", 1.0)
        designs = self._designs()
        whose = "the pseudo-defects'" if not designs else f"the pseudo-defects' ({designs} pooled)"
        if ev.get("chosen") == "best" or (ev.get("chosen") is None and self.lam_rel == ev.get("best")):
            text = (
                f"{ev['best']:g}, {whose} best in the window {span} (image AUROC {ev['auroc_a']:.3f} "
                f"against {ev['auroc_b']:.3f} at the default {ev['default']:g}: {ev['z']:+.1f} standard errors, "
                f"paired; it needs > {needed:g})"
            )
            settled = ev.get("settled")
            if not settled:
                return text
            within = settled.get("deviations", 1.0)
            if settled["lam_rel"] == ev["best"]:
                return f"{text}; no smaller lam_rel of the window is within {within:g} standard error of it"
            return (
                f"settled from {text} to the smallest lam_rel of the window within {within:g} standard error of "
                f"it ({settled['lam_rel']:g}: {settled['difference']:+.3f} below it, standard error "
                f"{settled['standard_error']:.3f})"
            )
        return (
            f"the default {ev['default']:g} (0.01, not below lam0): {whose} best in the window {span}, "
            f"{ev['best']:g}, did not beat it by more than {needed:g} standard error (image AUROC "
            f"{ev['auroc_a']:.3f} against {ev['auroc_b']:.3f}, {ev['z']:+.1f} standard errors, paired)"
        )

    # ---- dict form --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form model files and report.json store (the layout of earlier versions, plus ``reason``)."""
        out: dict[str, Any] = {
            "asked": dict(self.asked),
            "grid": list(self.grid),
            "families": {name: curves.to_dict() for name, curves in self.families.items()},
            "choice": {"spatial": self.spatial, "lam_rel": self.lam_rel},
            "held_out": self.held_out,
            "n_images": self.n_images,
            "reason": self.reason(),
            "seconds": self.seconds,
        }
        if self.made:
            out.update(
                pseudo_defects=list(self.pseudo_defects),
                criterion=self.criterion,
                pseudo_strength=self.pseudo_strength,
                evidence=self.evidence,
                paired_likelihood=self.paired_likelihood,
                pseudo_defect_seconds=self.pseudo_defect_seconds,
                local_model_seconds=self.model_seconds,
            )
            if self.pseudo_designs:
                out["pseudo_designs"] = [dict(d) for d in self.pseudo_designs]
        if self.fallback is not None:
            out["fallback"] = self.fallback
        if self.fit_seconds is not None:
            out["fit_seconds"] = self.fit_seconds
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SelectionRecord":
        """Read ``to_dict``'s form (or an earlier version's); ValueError naming what is missing or malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a selection record is an object, got {type(data).__name__}")
        choice = data.get("choice")
        if not isinstance(choice, Mapping) or any(k not in choice for k in _CHOICE_KEYS):
            raise ValueError("the selection record has no 'choice' with 'spatial' and 'lam_rel'")
        grid = [float(v) for v in data.get("grid") or []]
        families = data.get("families") or {}
        if not isinstance(families, Mapping):
            raise ValueError("the selection record's 'families' is not an object")
        return cls(
            asked=dict(data.get("asked") or {}),
            spatial=str(choice["spatial"]),
            lam_rel=None if choice["lam_rel"] is None else float(choice["lam_rel"]),
            n_images=int(data.get("n_images") or 0),
            held_out=int(data.get("held_out") or 0),
            grid=grid,
            families={str(k): FamilyCurves.from_dict(v, len(grid)) for k, v in families.items()},
            paired_likelihood=data.get("paired_likelihood"),
            evidence=data.get("evidence"),
            criterion=data.get("criterion"),
            pseudo_strength=data.get("pseudo_strength"),
            pseudo_defects=list(data.get("pseudo_defects") or []),
            pseudo_designs=_designs(data.get("pseudo_designs")),
            fallback=data.get("fallback"),
            pseudo_defect_seconds=data.get("pseudo_defect_seconds"),
            model_seconds=data.get("local_model_seconds"),
            seconds=float(data.get("seconds") or 0.0),
            fit_seconds=data.get("fit_seconds"),
            stored_reason=data.get("reason"),
        )


def _designs(data: Any) -> list[dict[str, Any]]:
    """The record's ``pseudo_designs`` (absent from earlier versions' records: none)."""
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(d, Mapping) and "name" in d for d in data):
        raise ValueError("the selection record's 'pseudo_designs' is not a list of objects with a 'name'")
    return [dict(d) for d in data]


def record_rows(record: SelectionRecord) -> list[tuple[float, dict[str, tuple[Optional[float], Optional[float]]]]]:
    """The record's curves by lam_rel: [(lam_rel, {family: (nll, pseudo-defect criterion)})], None where a curve
    was not evaluated."""
    rows = []
    for i, lam in enumerate(record.grid):
        cells = {
            f: (c.nll[i] if i < len(c.nll) else None, c.curve[i] if i < len(c.curve) else None)
            for f, c in record.families.items()
        }
        rows.append((lam, cells))
    return rows


def ordered_families(record: SelectionRecord) -> list[str]:
    """The record's families, the built-in ones first in ``FAMILY_ORDER``."""
    known = [f for f in FAMILY_ORDER if f in record.families]
    return known + [f for f in record.families if f not in known]


def selection_table(record: SelectionRecord) -> list[str]:
    """The record as text lines: one row per lam_rel; per family the held-out negative log-likelihood (nll) and
    the pseudo-defect criterion (crit). ``*`` marks the choice, ``<`` each family's likelihood minimiser lam0."""
    families = ordered_families(record)
    if not record.made:
        return []
    head = f"    {'lam_rel':>8} | " + " | ".join(f"{f + ' nll':>11} {'crit':>7} " for f in families)
    lines = [head]
    for lam, cells_by_family in record_rows(record):
        cells = []
        for f in families:
            nll, crit = cells_by_family[f]
            lam0 = "<" if record.families[f].lam0 == lam else " "
            mark = "*" if (f == record.spatial and lam == record.lam_rel) else " "
            nll_text = "-" if nll is None else format(nll, ".4f")
            crit_text = "-" if crit is None else format(crit, ".4f")
            cells.append(f"{nll_text:>10}{lam0} {crit_text:>7}{mark}")
        lines.append(f"    {lam:>8g} | " + " | ".join(cells))
    return lines


__all__ = ["FAMILY_ORDER", "FamilyCurves", "SelectionRecord", "ordered_families", "record_rows", "selection_table"]
