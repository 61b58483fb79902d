"""Choosing lam without labels: a grid of candidate lam values scored on pseudo-defects.

With C = U diag(s) U^T and z = U^T (y - mu) computed once for the held-out patches, the CRD score at
any lam is a diagonal reweighting,

    score(y; lam) = || diag(c) z ||,   c_i = lam / (s_i + lam),

so a whole grid costs one d x d rotation plus an O(d) pass per candidate. The candidate that ranks the
pseudo-defect images above the clean held-out ones best (image AUROC) wins, ties to the smaller lam_rel (the one
nearer the held-out likelihood's minimiser, the better model of normal patches: docs/DESIGN.md "Label-free lam").
AUPRO of the patch-grid maps against the pseudo-masks is recorded beside it but does not choose: on the
development set (elpv poly cells) it kept favouring larger lam (smoother maps) where the test set favoured
smaller ones. Which pseudo-defects make a useful yardstick is discussed in docs/DESIGN.md ("Label-free lam"):
defects that score ~1.0 for every lam cannot choose, and ones that no lam finds cannot either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import numpy as np
import torch

from ..choices import DEFAULT_LAM_GRID  # candidate lam_rel values (relative to trace(C)/d)
from ..metrics.scores import aupro, image_auroc

__all__ = [
    "DEFAULT_LAM_GRID",
    "LamSelection",
    "SettledChoice",
    "SpectralForm",
    "best_of_curve",
    "grid_masks",
    "paired_auroc_difference",
    "select_lam",
    "settled_choice",
]

#: Curve values within this of the curve's best are ties (they go to the smaller lam_rel).
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class SpectralForm:
    """C = U diag(s) U^T and mu: everything a grid of lam values needs."""

    mean: torch.Tensor  # (d,) or (P, d): a per-position mean is allowed (global covariance, local means)
    eigenvalues: torch.Tensor  # (d,), clamped at 0
    eigenvectors: torch.Tensor  # (d, d)

    @classmethod
    def from_covariance(cls, cov: torch.Tensor, mean: torch.Tensor) -> "SpectralForm":
        evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
        return cls(mean.to(torch.float64), evals.clamp_min(0.0), evecs)

    @property
    def mean_eigenvalue(self) -> float:
        return float(self.eigenvalues.sum()) / self.eigenvalues.shape[0]

    def rotate(self, patches: torch.Tensor) -> torch.Tensor:
        """z = U^T (y - mu) for patches (..., d) (or (..., P, d) with a per-position mean), in float64."""
        return (patches.to(torch.float64) - self.mean) @ self.eigenvectors

    def scores(self, z: torch.Tensor, lam_rel: float) -> torch.Tensor:
        """CRD scores of rotated patches z (..., d) at lam = lam_rel * trace(C) / d."""
        if not lam_rel > 0:
            raise ValueError(f"lam_rel must be positive, got {lam_rel}")
        lam = lam_rel * self.mean_eigenvalue
        return torch.linalg.vector_norm(z * (lam / (self.eigenvalues + lam)), dim=-1)


@dataclass(frozen=True)
class LamSelection:
    """The grid, the validation curve and the choice (stored in model files and shown in reports)."""

    grid: tuple[float, ...]
    image_auroc: tuple[float, ...]
    aupro: tuple[float, ...]
    choice: float
    criterion: str = "image AUROC on pseudo-defects, ties to the smaller lam_rel"
    extra: dict = field(default_factory=dict)

    @property
    def curve(self) -> tuple[float, ...]:
        """The criterion at each grid value: the image AUROC."""
        return self.image_auroc

    def to_json(self) -> dict:
        return {
            "grid": list(self.grid),
            "image_auroc": list(self.image_auroc),
            "aupro": list(self.aupro),
            "curve": list(self.curve),
            "choice": self.choice,
            "criterion": self.criterion,
            **self.extra,
        }


def grid_masks(masks: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Pixel masks (N, H, W) -> patch-grid masks (N, h, w): a cell is defective when any pixel in it is.

    H and W need not be multiples of h and w: cell boundaries are rounded (each pixel belongs to one cell).
    """
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    n, hh, ww = masks.shape
    h, w = grid_shape
    rows = np.minimum((np.arange(hh) * h) // hh, h - 1)
    cols = np.minimum((np.arange(ww) * w) // ww, w - 1)
    out = np.zeros((n, h, w), dtype=bool)
    idx, yy, xx = np.nonzero(masks)
    out[idx, rows[yy], cols[xx]] = True
    return out


def select_lam(
    score_fn: Callable[[float], np.ndarray],
    labels: np.ndarray,
    masks: np.ndarray,
    grid: Sequence[float] = DEFAULT_LAM_GRID,
) -> LamSelection:
    """Pick the lam_rel that ranks pseudo-defects best.

    Args:
        score_fn: lam_rel -> patch-score maps (N, h, w) of the held-out images (clean and pseudo-defect);
            an image's score is its map's maximum (as the detector's).
        labels: (N,) 1 for a pseudo-defect image, 0 for a clean held-out image.
        masks: (N, h, w) pseudo-defect masks on the patch grid (see :func:`grid_masks`); clean images all False.
        grid: candidate lam_rel values.

    The choice maximises the image AUROC; ties (within ``TIE_TOLERANCE``) go to the smaller lam_rel. AUPRO is
    recorded, not used (see the module docstring).
    """
    grid = tuple(float(g) for g in grid)
    if not grid or any(not g > 0 for g in grid):
        raise ValueError(f"the lam grid must hold positive values, got {grid}")
    labels = np.asarray(labels).astype(int)
    masks = np.asarray(masks).astype(bool)
    if masks.shape[0] != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels but {masks.shape[0]} masks")
    aurocs, apros = [], []
    for lam_rel in grid:
        maps = np.asarray(score_fn(lam_rel), dtype=np.float64)
        if maps.shape != masks.shape:
            raise ValueError(f"score_fn({lam_rel}) gave maps of shape {maps.shape}, the masks are {masks.shape}")
        img = maps.reshape(maps.shape[0], -1).max(axis=1)
        aurocs.append(float(image_auroc(labels, img)))
        apros.append(float(aupro(masks, maps)) if masks.any() else float("nan"))
    return LamSelection(grid, tuple(aurocs), tuple(apros), best_of_curve(grid, aurocs))


Key = TypeVar("Key")


def best_of_curve(keys: Sequence[Key], curve: Sequence[float]) -> Key:
    """The key (a lam_rel, or its grid index) of ``curve``'s largest value, ties (within ``TIE_TOLERANCE``) to the
    smallest key (the smaller lam_rel)."""
    if len(keys) != len(curve) or not len(keys):
        raise ValueError(f"{len(keys)} lam_rel values but {len(curve)} curve values (both must be non-empty)")
    values = np.asarray(curve, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"the curve must be finite, got {values.tolist()}")
    top = float(values.max())
    return min(k for k, v in zip(keys, values) if v >= top - TIE_TOLERANCE)


def paired_auroc_difference(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image AUROC of two scorings of the same images, their difference a - b and its standard error (DeLong,
    DeLong and Clarke-Pearson 1988: the variance from each image's structural components, paired because both
    scorings rank the same images), and z = difference / standard error (+-inf for a nonzero difference with a
    zero standard error, 0 for none)."""
    labels = np.asarray(labels).astype(bool)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != labels.shape or b.shape != labels.shape or a.ndim != 1:
        raise ValueError(f"scores {a.shape} and {b.shape} must both match the labels {labels.shape}, one per image")
    if labels.all() or not labels.any():
        raise ValueError("the labels must hold both classes (1 = pseudo-defect, 0 = clean)")

    def components(s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        pos, neg = s[labels], s[~labels]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return float(psi.mean()), psi.mean(axis=1), psi.mean(axis=0)

    auc_a, pos_a, neg_a = components(a)
    auc_b, pos_b, neg_b = components(b)
    variance = 0.0
    for x, y in ((pos_a, pos_b), (neg_a, neg_b)):
        if x.size > 1:
            variance += float(np.var(x - y, ddof=1)) / x.size  # var(x) + var(y) - 2 cov(x, y), per component
    difference = auc_a - auc_b
    se = float(np.sqrt(max(variance, 0.0)))
    z = difference / se if se > 0 else (float(np.sign(difference)) * np.inf if difference else 0.0)
    return {"auroc_a": auc_a, "auroc_b": auc_b, "difference": difference, "standard_error": se, "z": float(z)}


@dataclass(frozen=True)
class SettledChoice:
    """What :func:`settled_choice` decided: the curve's ``best`` and the ``default``, their paired comparison
    (``evidence``: ``compare(best, default)``), whether the best replaced the default (``beats``), the
    ``settled`` comparison (``compare(best, choice)``, None while the default stands) and the ``choice``."""

    best: Any
    default: Any
    evidence: Mapping[str, float]
    beats: bool
    choice: Any
    settled: Optional[Mapping[str, float]] = None


def settled_choice(
    window: Sequence[Key],
    curve: Sequence[float],
    default: Key,
    compare: Callable[[Key, Key], Mapping[str, float]],
    deviations: float = 1.0,
    settle: Optional[float] = 1.0,
) -> SettledChoice:
    """The pseudo-defects' rule for lam_rel (bench/RESULTS.md "Choosing lam_rel without labels"; docs/DESIGN.md
    "The detector's choice of spatial model and lam_rel").

    ``window``: the candidate lam_rel values (or their grid indices) in increasing order, ``curve`` the criterion
    at each (image AUROC of the pseudo-defects against the clean held-out images); ``default``: kept without
    evidence (it need not lie in the window); ``compare(a, b)``: the paired comparison of a with b, a mapping with
    ``difference`` (a - b), ``standard_error`` and ``z`` (``paired_auroc_difference``, or a pooled one).

    1. best: the curve's best in the window, ties to the smaller lam_rel (:func:`best_of_curve`);
    2. it replaces the default only if ``compare(best, default)`` has z > ``deviations``;
    3. then (``settle`` not None) walking up the window, the first lam_rel whose difference from the best is at
       most ``settle`` of its standard errors (the one-standard-error rule toward lam0; the best itself at the
       latest) is the choice.
    """
    window = list(window)
    if any(b <= a for a, b in zip(window, window[1:])):
        raise ValueError(f"the window must be in increasing order without repeats, got {window}")
    best = best_of_curve(window, curve)
    evidence = dict(compare(best, default))
    missing = {"difference", "standard_error", "z"} - set(evidence)
    if missing:
        raise ValueError(f"compare gave no {sorted(missing)}")
    beats = best != default and evidence["z"] > deviations
    if not beats:
        return SettledChoice(best, default, evidence, False, default)
    choice, settled = best, {"difference": 0.0, "standard_error": 0.0, "z": 0.0}
    if settle is not None:
        for key in window[: window.index(best)]:
            step = dict(compare(best, key))
            if step["difference"] <= settle * step["standard_error"]:
                choice, settled = key, step
                break
    return SettledChoice(best, default, evidence, True, choice, settled)
