"""The label-free choice's decision on the held-out images: which scoring model, at which lam_rel.

Given the candidate models fitted on the rest of the training images (``ScoringModel.candidate()``, simplest
first) and the held-out set (clean grids and pseudo-defect grids), :func:`choose` measures two things
(docs/DESIGN.md "Label-free lam"):

* how well each candidate describes the clean held-out patches: the Gaussian negative log-likelihood under
  N(mu, S + lam I) over the lam grid, minimised at the candidate's lam0. A more complex candidate replaces a
  simpler one only if, paired over the clean held-out images, its likelihood at its lam0 is better by more than
  ``FAMILY_STANDARD_ERRORS`` standard errors;
* how well the chosen model ranks the pseudo-defects (every design's, pooled) above the clean images at each
  lam_rel at or above lam0 (``select_lam``'s image AUROC): their best replaces the default (``no_evidence_lam``)
  only if it beats it by more than ``EVIDENCE_DEVIATIONS`` standard errors of the paired difference (DeLong); then
  the choice settles on the smallest lam_rel of the window within ``SETTLE_DEVIATIONS`` standard errors of the best
  (``settled_choice``; bench/RESULTS.md "Choosing lam_rel without labels").

The result is facts only (a :class:`Choice`); crd_fast/selection/record.py says them in words.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..choices import DEFAULT_LAM_REL
from ..core.lam_selection import LamSelection, paired_auroc_difference, select_lam, settled_choice
from ..scoring.candidates import Candidate
from .held_out import PSEUDO_DESIGNS, HeldOutSet
from .record import FamilyCurves

#: Standard errors by which a more complex model's held-out likelihood must beat a simpler one's (paired over the
#: held-out images, ``paired_comparison``) to be chosen: the simpler model is the better bet otherwise.
FAMILY_STANDARD_ERRORS = 2.0
#: Standard errors by which the pseudo-defects' best lam_rel in the window must beat the default
#: (``no_evidence_lam``) in image AUROC, paired over the held-out images (``paired_auroc_difference``), to replace
#: it: with few held-out images the curve is noisy, and the default is the better bet (docs/DESIGN.md "Label-free
#: lam").
EVIDENCE_DEVIATIONS = 1.0
#: Once the best replaced the default: the smallest lam_rel of the window whose paired AUROC difference from the
#: best is at most this many of its standard errors is taken (the one-standard-error rule, toward lam0).
SETTLE_DEVIATIONS = 1.0
#: What the record's curves hold and how they choose, as it states them.
CRITERION = (
    "spatial and lam0: lowest held-out Gaussian negative log-likelihood (nll); lam_rel at or above lam0: "
    f"{LamSelection.criterion} (curve; held-out training images, pseudo-defects "
    + " + ".join(d.name for d in PSEUDO_DESIGNS)
    + f" pooled); the best replaces the default if > {EVIDENCE_DEVIATIONS:g} paired standard error better, then "
    f"the smallest lam_rel within {SETTLE_DEVIATIONS:g} standard error of it"
)


@dataclass
class Choice:
    """The decision: the model ``spatial`` at ``lam_rel``, each candidate's curves, the likelihood comparison that
    chose the model (None with one candidate) and the pseudo-defects' evidence for lam_rel."""

    spatial: str
    lam_rel: float
    families: dict[str, FamilyCurves]
    paired_likelihood: Optional[dict[str, Any]]
    evidence: dict[str, Any]


def _finite_or_none(values: Sequence[float]) -> list[Optional[float]]:
    return [float(v) if math.isfinite(v) else None for v in values]


def lam_window(lam_grid: Sequence[float], lam0: float) -> list[float]:
    """The grid values at or above lam0 (the window the pseudo-defects search): below the likelihood's minimiser
    the model describes normal patches worse and its scores amplify noise (docs/DESIGN.md "Label-free lam")."""
    return [g for g in lam_grid if g >= lam0 * (1 - 1e-9)]


def no_evidence_lam(lam_grid: Sequence[float], lam0: float) -> float:
    """The default lam_rel, kept unless the pseudo-defects beat it clearly: DEFAULT_LAM_REL, but not below lam0
    (a fixed lam_rel: itself). 0.01 is where the generated categories' defects are found best (docs/DESIGN.md
    "lam_rel"), and below lam0 the model fits normal patches worse."""
    if len(lam_grid) == 1:
        return float(lam_grid[0])
    return max(DEFAULT_LAM_REL, lam0)


def paired_comparison(complex_: np.ndarray, simple: np.ndarray) -> dict[str, float]:
    """A more complex minus a simpler model's held-out negative log-likelihood per clean held-out image (each at its
    own lam0): mean, standard error and their ratio t. The complex one is chosen when t < -FAMILY_STANDARD_ERRORS."""
    diff = np.asarray(complex_, dtype=np.float64) - np.asarray(simple, dtype=np.float64)
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.inf
    t = mean / se if se > 0 else (-math.inf if mean < 0 else math.inf if mean > 0 else 0.0)
    return {"mean_difference": mean, "standard_error": se, "t": t}


def _likelihood_curves(per_image: np.ndarray, lam_grid: Sequence[float]) -> tuple[FamilyCurves, np.ndarray]:
    """A candidate's likelihood curve over the grid from its per-image values (L, N), and those at lam0."""
    nll = [float(x.mean()) for x in per_image]
    best = int(np.nanargmin(np.asarray(nll, dtype=float)))
    diffs = per_image - per_image[best]  # (lams, n_clean): paired against lam0
    curves = FamilyCurves(
        nll=_finite_or_none(nll),
        nll_se=_finite_or_none(diffs.std(axis=1, ddof=1) / math.sqrt(diffs.shape[1])),
        lam0=lam_grid[best],
        window=lam_window(lam_grid, lam_grid[best]),
    )
    return curves, per_image[best]


@dataclass
class FamilyChoice:
    """The first half of the decision: the model ``spatial``, every candidate's likelihood curves, the paired
    comparison (None with one candidate) and the chosen candidate's clean patch scores (H, P) at every lam_rel the
    second half reads (``lams``: its window and its default), so the clean grids may go before the pseudo-defects
    are scored."""

    spatial: str
    families: dict[str, FamilyCurves]
    paired_likelihood: Optional[dict[str, Any]]
    clean_maps: dict[float, np.ndarray]

    @property
    def lams(self) -> list[float]:
        """The lam_rel values ``choose_lam`` scores: the chosen model's window and its default, ascending."""
        return sorted(self.clean_maps)


def _check_grid(held: HeldOutSet) -> tuple[int, int]:
    h, w = held.masks.shape[1:]
    if held.clean_shape[1] != h * w:
        raise ValueError(f"held-out grids have {held.clean_shape[1]} positions, the masks {h}x{w}")
    return h, w


def choose_family(held: HeldOutSet, lam_grid: Sequence[float], candidates: Mapping[str, Candidate]) -> FamilyChoice:
    """The model, by the clean held-out images' likelihood, from ``candidates`` (name -> candidate, simplest
    first), and its clean images' patch scores at the lam_rel values ``choose_lam`` reads: it needs no
    pseudo-defect, so the caller may free the other candidates and the clean grids before those are made."""
    lam_grid = tuple(float(g) for g in lam_grid)
    _check_grid(held)
    if not candidates:
        raise ValueError("no candidate model to select from")
    families: dict[str, FamilyCurves] = {}
    clean_maps: dict[str, np.ndarray] = {}
    at_lam0: dict[str, np.ndarray] = {}
    for name, cand in candidates.items():
        started = time.perf_counter()
        evaluation = cand.evaluate(held.clean_grids, lam_grid)
        clean_maps[name] = evaluation.maps
        families[name], at_lam0[name] = _likelihood_curves(evaluation.nll, lam_grid)
        families[name].seconds = round(time.perf_counter() - started, 4)  # rotation and every lam's likelihood
    names = list(candidates)
    spatial, paired = names[0], None
    for name in names[1:]:
        comparison = paired_comparison(at_lam0[name], at_lam0[spatial])
        paired = {"model": name, "against": spatial, "standard_errors_needed": FAMILY_STANDARD_ERRORS, **comparison}
        if comparison["t"] < -FAMILY_STANDARD_ERRORS:
            spatial = name
    curves = families[spatial]
    started = time.perf_counter()
    lams = sorted(set(curves.window) | {no_evidence_lam(lam_grid, curves.lam0)})
    chosen = clean_maps[spatial]
    clean = {
        lam: chosen[lam_grid.index(lam)] if lam in lam_grid else candidates[spatial].maps(held.clean_grids, [lam])[0]
        for lam in lams
    }
    curves.seconds = round(curves.seconds + time.perf_counter() - started, 4)
    return FamilyChoice(spatial, families, paired, clean)


def choose(held: HeldOutSet, lam_grid: Sequence[float], candidates: Mapping[str, Candidate]) -> Choice:
    """Choose (model, lam_rel) on the held-out set from ``candidates`` (name -> candidate, simplest first)."""
    family = choose_family(held, lam_grid, candidates)
    return choose_lam(held, lam_grid, candidates[family.spatial], family)


def choose_lam(held: HeldOutSet, lam_grid: Sequence[float], cand: Candidate, family: FamilyChoice) -> Choice:
    """lam_rel by the pseudo-defects, in the window of ``family``'s chosen model ``cand``; the whole decision."""
    lam_grid = tuple(float(g) for g in lam_grid)
    h, w = _check_grid(held)
    started = time.perf_counter()
    spatial, families = family.spatial, family.families
    curves = families[spatial]
    window = curves.window
    default = no_evidence_lam(lam_grid, curves.lam0)
    lams = family.lams
    embedding = held.pseudo.seconds
    pseudo_maps = held.pseudo.maps(cand, lams)  # (lams, D H, P); the clean images' came with the likelihood
    embedding = held.pseudo.seconds - embedding  # the forward passes are the pseudo-defects' time, not the model's
    maps: dict[float, np.ndarray] = {}
    for i, lam in enumerate(lams):
        maps[lam] = np.concatenate([family.clean_maps[lam], pseudo_maps[i]]).reshape(-1, h, w)
    del pseudo_maps
    in_window = select_lam(maps.__getitem__, held.labels, held.all_masks, window)
    scores = {lam: image_map.reshape(image_map.shape[0], -1).max(axis=1) for lam, image_map in maps.items()}

    def compare(a: float, b: float) -> dict[str, float]:
        return paired_auroc_difference(scores[a], scores[b], held.labels)

    rule = settled_choice(window, in_window.image_auroc, default, compare, EVIDENCE_DEVIATIONS, SETTLE_DEVIATIONS)
    evidence = {
        "best": rule.best,
        "default": default,
        **rule.evidence,
        "deviations_needed": EVIDENCE_DEVIATIONS,
        "chosen": "best" if rule.beats else "default",
        "pseudo_defects": len(held.pseudo),
        "clean": held.n_clean,
    }
    if rule.settled is not None:
        evidence["settled"] = {
            "lam_rel": rule.choice,
            "difference": rule.settled["difference"],
            "standard_error": rule.settled["standard_error"],
            "deviations": SETTLE_DEVIATIONS,
        }
    lam = rule.choice

    def over_grid(values: Sequence[float]) -> list[Optional[float]]:
        inside = dict(zip(window, _finite_or_none(values)))
        return [inside.get(g) for g in lam_grid]

    for name, other in families.items():
        chosen = name == spatial
        other.image_auroc = over_grid(in_window.image_auroc) if chosen else [None] * len(lam_grid)
        other.aupro = over_grid(in_window.aupro) if chosen else [None] * len(lam_grid)
        other.curve = over_grid(in_window.curve) if chosen else [None] * len(lam_grid)  # select_lam's criterion
        other.lam_rel = lam if chosen else None
    curves.window_best_auroc = max(in_window.image_auroc)
    curves.seconds = round(curves.seconds + time.perf_counter() - started - embedding, 4)
    return Choice(spatial, lam, families, family.paired_likelihood, evidence)


__all__ = [
    "CRITERION",
    "EVIDENCE_DEVIATIONS",
    "FAMILY_STANDARD_ERRORS",
    "SETTLE_DEVIATIONS",
    "Choice",
    "FamilyChoice",
    "choose",
    "choose_family",
    "choose_lam",
    "lam_window",
    "no_evidence_lam",
    "paired_comparison",
]
