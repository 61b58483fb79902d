"""The label-free criteria bench/experiments/lam_criteria.py compares, as functions of one measured record.

A record (lam_criteria_measure.py) holds, for one (backbone, set): the test patch maps of both spatial families
at every lam_rel of the grid (fitted on all training images), PaDiM's test image scores, and for each held-out
fold the clean held-out images' likelihoods and patch maps and the pseudo-defect designs' image scores (both
families fitted on the rest). A criterion sees everything but the test labels and returns, for one family,
either a lam_rel of the grid (the test score is then that lam_rel's) or test image scores of its own (a score
that needs no choice). Image score = the largest patch score, as the detector's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from crd_fast.choices import DEFAULT_LAM_REL
from crd_fast.core.lam_selection import paired_auroc_difference, settled_choice
from crd_fast.metrics.scores import image_auroc
from crd_fast.selection.choice import FAMILY_STANDARD_ERRORS, paired_comparison

FAMILIES = ("global", "local")
#: Kind subsets of the defect-like designs (crd_fast/synthetic/pseudo.py DEFECT_LIKE).
SUBSETS: dict[str, Optional[tuple[str, ...]]] = {
    "all": None,
    "lowfreq": ("dark_region", "shading", "blended_patch"),
    "highfreq": ("dark_crack", "finger_breaks"),
}


@dataclass
class Record:
    """One (backbone, set): see the module docstring."""

    backbone: str
    name: str
    grid: tuple[float, ...]
    labels: np.ndarray  # (M,)
    test_maps: dict[str, np.ndarray]  # family -> (M, P, L)
    padim: np.ndarray  # (M,)
    folds: list[dict]  # per fold: nll_F (H, L), clean_F (H, P, L), pseudo_<design>_F (H, L), kinds_<design> (H,)
    _cache: dict = field(default_factory=dict, repr=False)

    def test_scores(self, family: str) -> np.ndarray:
        """(M, L) test image scores."""
        key = ("test", family)
        if key not in self._cache:
            self._cache[key] = self.test_maps[family].max(axis=1)
        return self._cache[key]

    def test_curve(self, family: str) -> np.ndarray:
        """(L,) test image AUROC of every lam_rel (the oracle's curve)."""
        key = ("curve", family)
        if key not in self._cache:
            s = self.test_scores(family)
            self._cache[key] = np.array([image_auroc(self.labels, s[:, j]) for j in range(len(self.grid))])
        return self._cache[key]

    def auroc(self, scores: np.ndarray) -> float:
        return float(image_auroc(self.labels, scores))

    def index(self, lam: float) -> int:
        return int(np.argmin(np.abs(np.log(np.asarray(self.grid)) - math.log(lam))))


@dataclass
class Choice:
    lam: Optional[float]  # None: a score of its own (``scores``)
    scores: Optional[np.ndarray] = None
    note: str = ""


Criterion = Callable[[Record, str], Choice]


# -- the spatial model and lam0: the held-out likelihood ------------------------------------------------------
def lam0_index(rec: Record, family: str, folds: Sequence[int] = (0,)) -> int:
    nll = np.concatenate([rec.folds[f][f"nll_{family}"] for f in folds])  # (H', L)
    return int(np.nanargmin(nll.mean(axis=0)))


def spatial_choice(rec: Record) -> tuple[str, float]:
    """The detector's choice of family (fold 0: local if its likelihood at its lam0 beats global's at its lam0 by
    more than FAMILY_STANDARD_ERRORS paired standard errors) and the t of that comparison."""
    at = {f: rec.folds[0][f"nll_{f}"][:, lam0_index(rec, f)] for f in FAMILIES}
    t = paired_comparison(at["local"], at["global"])["t"]
    return ("local" if t < -FAMILY_STANDARD_ERRORS else "global"), float(t)


def window(rec: Record, family: str, folds: Sequence[int]) -> list[int]:
    """Grid indices at or above lam0 (the detector's ``lam_window``)."""
    return list(range(lam0_index(rec, family, folds), len(rec.grid)))


def no_evidence_index(rec: Record, family: str, folds: Sequence[int]) -> int:
    """The detector's default: DEFAULT_LAM_REL, or lam0 if larger (``no_evidence_lam``)."""
    return max(rec.index(DEFAULT_LAM_REL), lam0_index(rec, family, folds))


# -- pseudo-defect evidence -----------------------------------------------------------------------------------
def _fold_scores(rec: Record, fold: int, design, family: str, kinds: Optional[tuple[str, ...]], j: int):
    """Image scores of one fold's clean held-out images and pseudo-defect images (``design``: a design, or a
    tuple of designs pooled), with labels (1 = pseudo-defect)."""
    clean = rec.folds[fold][f"clean_{family}"].max(axis=1)[:, j]
    pseudo = []
    for d in (design,) if isinstance(design, str) else design:
        p = rec.folds[fold][f"pseudo_{d}_{family}"][:, j]
        pseudo.append(p if kinds is None else p[np.isin(rec.folds[fold][f"kinds_{d}"], kinds)])
    pseudo = np.concatenate(pseudo)
    labels = np.r_[np.zeros(len(clean)), np.ones(len(pseudo))]
    return np.r_[clean, pseudo], labels


def pseudo_curve(rec: Record, family: str, design: str, folds: Sequence[int], kinds=None) -> np.ndarray:
    """(L,) pseudo-defect image AUROC, the mean over the folds (each fold's rest model ranks its own images)."""
    key = ("pseudo_curve", family, design, tuple(folds), kinds)
    if key not in rec._cache:
        rec._cache[key] = _pseudo_curve(rec, family, design, folds, kinds)
    return rec._cache[key]


def _pseudo_curve(rec: Record, family: str, design, folds: Sequence[int], kinds) -> np.ndarray:
    out = np.zeros(len(rec.grid))
    for j in range(len(rec.grid)):
        values = []
        for f in folds:
            scores, labels = _fold_scores(rec, f, design, family, kinds, j)
            if labels.any():  # a fold of a few images may lack a kind
                values.append(image_auroc(labels, scores))
        out[j] = np.mean(values) if values else np.nan
    return out


def pseudo_evidence(rec: Record, family: str, design: str, folds: Sequence[int], a: int, b: int, kinds=None):
    """Pooled over folds: mean AUROC difference (a - b), its standard error (DeLong per fold, folds independent)
    and z."""
    key = ("evidence", family, design, tuple(folds), a, b, kinds)
    if key not in rec._cache:
        rec._cache[key] = _pseudo_evidence(rec, family, design, folds, a, b, kinds)
    return rec._cache[key]


def _pseudo_evidence(rec: Record, family: str, design, folds: Sequence[int], a: int, b: int, kinds):
    diffs, variances = [], []
    for f in folds:
        sa, labels = _fold_scores(rec, f, design, family, kinds, a)
        sb, _ = _fold_scores(rec, f, design, family, kinds, b)
        if not labels.any():
            continue
        d = paired_auroc_difference(sa, sb, labels)
        diffs.append(d["difference"])
        variances.append(d["standard_error"] ** 2)
    diff = float(np.mean(diffs))
    se = math.sqrt(sum(variances)) / len(diffs)
    z = diff / se if se > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    return diff, se, z


def pseudo_rule(
    design,
    folds: Optional[int] = 1,
    z_needed: float = 1.0,
    kinds=None,
    in_window: bool = True,
    settle: Optional[float] = None,
    default: str = "detector",
) -> Criterion:
    """The pseudo-defects' best lam_rel (mean image AUROC over ``folds`` held-out folds; None: every fold; ties to
    the smaller lam_rel) in the window at or above lam0 (or the whole grid), taken when it beats the default
    by more than ``z_needed`` pooled standard errors. ``default``: "detector" (DEFAULT_LAM_REL, not below lam0,
    ``no_evidence_lam``), "fixed" (DEFAULT_LAM_REL) or "lam0". design "x4", folds 1, z 1, window, default
    "detector": the detector's rule.

    ``settle``: once the default is left, take the smallest lam_rel of the window (the nearest lam0, the better
    model of normal patches) whose pseudo-defect AUROC is within ``settle`` standard errors of the best's (the
    one-standard-error rule of model selection), not the best itself."""

    def rule(rec: Record, family: str) -> Choice:
        use = list(range(len(rec.folds) if folds is None else min(folds, len(rec.folds))))
        cand = window(rec, family, use) if in_window else list(range(len(rec.grid)))
        curve = pseudo_curve(rec, family, design, use, kinds)
        start = {
            "detector": lambda: no_evidence_index(rec, family, use),
            "fixed": lambda: rec.index(DEFAULT_LAM_REL),
            "lam0": lambda: lam0_index(rec, family, use),
        }[default]()

        def compare(a: int, b: int) -> dict[str, float]:
            return dict(
                zip(("difference", "standard_error", "z"), pseudo_evidence(rec, family, design, use, a, b, kinds))
            )

        # the detector's rule (crd_fast/core/lam_selection.py settled_choice), on grid indices
        decided = settled_choice(cand, curve[cand], start, compare, z_needed, settle)
        best, z = decided.best, decided.evidence["z"]
        note = f"curve {np.round(curve, 3).tolist()}"
        if best == start:
            return Choice(rec.grid[best], note=f"best = default, {note}")
        if not decided.beats:
            return Choice(rec.grid[start], note=f"best {rec.grid[best]:g} z {z:+.2f}, {note}")
        j = decided.choice
        return Choice(rec.grid[j], note=f"best {rec.grid[best]:g} z {z:+.2f}, settled {rec.grid[j]:g}, {note}")

    return rule


def adaptive_rule(designs: Sequence[str], target: float, folds: Optional[int] = None, z_needed: float = 1.0):
    """Pseudo-defects calibrated to a difficulty: of ``designs`` (one kind set at several strengths), the one whose
    image AUROC at the default lam_rel is nearest ``target`` (neither found by every lam nor by none), then
    :func:`pseudo_rule` with it."""

    def rule(rec: Record, family: str) -> Choice:
        use = list(range(len(rec.folds) if folds is None else min(folds, len(rec.folds))))
        j = no_evidence_index(rec, family, use)
        level = {d: pseudo_curve(rec, family, d, use)[j] for d in designs}
        design = min(designs, key=lambda d: abs(level[d] - target))
        choice = pseudo_rule(design, folds, z_needed)(rec, family)
        return Choice(choice.lam, note=f"{design} (AUROC {level[design]:.3f} at the default); {choice.note}")

    return rule


# -- fixed rules -----------------------------------------------------------------------------------------------
def fixed(lam: float) -> Criterion:
    return lambda rec, family: Choice(lam)


def lam0_rule(folds: Optional[int] = 1, decades: float = 0.0) -> Criterion:
    """lam0 (the held-out likelihood's minimiser, over ``folds`` folds) times 10**decades, within the grid."""

    def rule(rec: Record, family: str) -> Choice:
        use = list(range(len(rec.folds) if folds is None else min(folds, len(rec.folds))))
        j0 = lam0_index(rec, family, use)
        target = math.log10(rec.grid[j0]) + decades
        j = min(range(len(rec.grid)), key=lambda i: (abs(math.log10(rec.grid[i]) - target), i))
        return Choice(rec.grid[j], note=f"lam0 {rec.grid[j0]:g}")

    return rule


# -- scores that need no choice ----------------------------------------------------------------------------
def mean_standardised(level: str = "image", span: str = "grid", log: bool = False) -> Criterion:
    """The mean over lam_rel of standardised scores: each lam_rel's scores minus the clean held-out images' mean,
    over their standard deviation (pooled over every fold), averaged over the grid (span "grid") or over the
    window at or above lam0 ("window"). level "image": image scores (largest patch score) are standardised and
    averaged; "patch": patch scores, standardised by the clean held-out patches, averaged, then the largest
    patch. ``log``: of log scores."""

    def rule(rec: Record, family: str) -> Choice:
        use = list(range(len(rec.folds)))
        js = window(rec, family, use) if span == "window" else list(range(len(rec.grid)))
        f = np.log if log else (lambda a: a)
        clean = np.concatenate([rec.folds[i][f"clean_{family}"] for i in use])  # (H', P, L)
        test = rec.test_maps[family]
        if level == "image":
            c, t = f(clean.max(axis=1)[:, js]), f(test.max(axis=1)[:, js])
            return Choice(None, ((t - c.mean(0)) / c.std(0)).mean(axis=1))
        c = f(np.maximum(clean[:, :, js], 1e-30)).reshape(-1, len(js))
        t = f(np.maximum(test[:, :, js], 1e-30))
        return Choice(None, ((t - c.mean(0)) / c.std(0)).mean(axis=2).max(axis=1))

    return rule
