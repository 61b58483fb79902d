"""Label-free choice of the detector's lam_rel and spatial model (lam_rel="auto", spatial="auto").

The fit holds out a few training images (:class:`HeldOutPlan`), fits every candidate model on the rest and
evaluates it on the held-out images two ways (:func:`evaluate_candidates`):

* how well it describes their clean patches: the Gaussian negative log-likelihood under N(mu, S + lam I),
  which chooses the spatial family and lam0, the lam that regularises the covariance best;
* how well it ranks pseudo-defects (crd_fast/synthetic/pseudo.py at PSEUDO_STRENGTH, one painted on each
  held-out image) above the clean images (``select_lam``'s criterion), which moves lam_rel from its default to a
  value at or above lam0 when it does so clearly better there.

Why at or above lam0, and why strong pseudo-defects: docs/DESIGN.md "Label-free lam". Every lam of
one family costs a diagonal reweighting of patches rotated once (crd_fast/core/lam_selection.py,
crd_fast/core/local.py), so the cost is the held-out images' extra forward passes plus one rotation per family.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..choices import DEFAULT_LAM_REL
from ..core.lam_selection import LamSelection, grid_masks, paired_auroc_difference, select_lam
from ..core.stats import PatchStatistics
from ..synthetic.pseudo import make_pseudo_defects
from .candidates import GlobalCandidate, LocalCandidate

#: Fewer training images than this: no hold-out, no selection (spatial "global", lam_rel DEFAULT_LAM_REL).
MIN_IMAGES = 20
#: Held-out images: min(MAX_HELD_OUT, N // 5), and at least MIN_HELD_OUT.
MAX_HELD_OUT = 24
MIN_HELD_OUT = 4
#: When the number of images is not known up front, every STREAM_STRIDE-th image is held out (up to MAX_HELD_OUT).
STREAM_STRIDE = 8

SPATIAL_FAMILIES = ("global", "local")
#: The pseudo-defects' painted change is multiplied by this (``make_pseudo_defects``'s strength): at 1 a random
#: backbone on the development set told none of them from clean images at any lam (docs/DESIGN.md "Label-free lam").
PSEUDO_STRENGTH = 4.0
#: Standard errors by which the local model's held-out likelihood must beat global's (paired over the held-out
#: images, ``paired_comparison``) for local to be chosen: the global model is the simpler one.
LOCAL_STANDARD_ERRORS = 2.0
#: Standard errors by which the pseudo-defects' best lam_rel in the window must beat the default
#: (``no_evidence_lam``) in image AUROC, paired over the held-out images (``paired_auroc_difference``), to replace
#: it: with few held-out images the curve is noisy, and the default is the better bet (docs/DESIGN.md "Label-free
#: lam").
EVIDENCE_DEVIATIONS = 1.0
#: What the record's curves hold, as it states them.
CRITERION = (
    "spatial and lam0: lowest held-out Gaussian negative log-likelihood (nll); lam_rel at or above lam0: "
    f"{LamSelection.criterion} (curve; held-out training images, pseudo-defects x{PSEUDO_STRENGTH:g})"
)


def held_out_count(n_images: int) -> int:
    """How many of ``n_images`` (>= MIN_IMAGES) training images are held out."""
    return max(MIN_HELD_OUT, min(MAX_HELD_OUT, n_images // 5))


class HeldOutPlan:
    """Which training images (by their position in the stream) are held out for the selection.

    With the count known: ``held_out_count(count)`` positions evenly spaced over the stream (none below
    MIN_IMAGES). Unknown: every STREAM_STRIDE-th image, up to MAX_HELD_OUT.
    """

    def __init__(self, count: Optional[int]) -> None:
        self.count = count
        self.held = 0
        self._positions: Optional[frozenset[int]] = None
        if count is not None:
            if count < MIN_IMAGES:
                self._positions = frozenset()
            else:
                h = held_out_count(count)
                self._positions = frozenset(((2 * i + 1) * count) // (2 * h) for i in range(h))

    def take(self, position: int) -> bool:
        """Whether the image at stream ``position`` is held out (call once per image, in order)."""
        if self._positions is not None:
            hold = position in self._positions
        else:
            hold = position % STREAM_STRIDE == STREAM_STRIDE - 1 and self.held < MAX_HELD_OUT
        self.held += int(hold)
        return hold


def fallback_reason(n_images: int, held: int) -> Optional[str]:
    """Why no selection can be made with ``n_images`` training images, ``held`` of them held out (None: it can)."""
    if n_images < MIN_IMAGES:
        return f"only {n_images} training images (fewer than {MIN_IMAGES}): no hold-out, no selection"
    if held < MIN_HELD_OUT:
        return f"only {held} images held out (fewer than {MIN_HELD_OUT}): no selection"
    return None


def fallback_record(
    asked: dict[str, Any], spatial: str, lam_rel: float, n_images: int, reason: str, held: int = 0
) -> dict:
    """The selection record when no selection was made (the defaults apply)."""
    return {
        "asked": asked,
        "grid": [],
        "families": {},
        "choice": {"spatial": spatial, "lam_rel": lam_rel},
        "held_out": held,
        "n_images": n_images,
        "reason": f"{reason}; spatial {spatial!r}, lam_rel {lam_rel:g}",
        "seconds": 0.0,
    }


def default_choice(families: Sequence[str], lam_grid: Sequence[float]) -> tuple[str, float]:
    """(spatial, lam_rel) without a selection: global when allowed, DEFAULT_LAM_REL when lam is open."""
    spatial = "global" if "global" in families else families[0]
    lam = float(lam_grid[0]) if len(lam_grid) == 1 else DEFAULT_LAM_REL
    return spatial, lam


def pseudo_defect_batch(
    clean: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int, strength: float = PSEUDO_STRENGTH
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """One pseudo-defect (at ``strength``) per normalised input of ``clean`` (H, 3, S, S), made on the
    de-normalised picture.

    Returns the pseudo-defect inputs normalised again with ``mean``/``std`` (H, 3, S, S) float32, their pixel
    masks (H, S, S) bool and the kinds painted. The other held-out pictures are the cut-and-paste donors.
    """
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    pictures = (clean.float().cpu() * s + m).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().numpy()
    rng = np.random.default_rng(seed)
    images, masks, kinds = make_pseudo_defects(rng, list(pictures), list(pictures), strength=strength)
    painted = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return ((painted - m) / s).contiguous(), np.stack(masks), kinds


@dataclass
class HeldOutSet:
    """The held-out images' patch grids, clean and with pseudo-defects, and the pseudo-defect grid masks."""

    clean: torch.Tensor  # (H, P, d) float32
    pseudo: torch.Tensor  # (H, P, d) float32
    masks: np.ndarray  # (H, h, w) bool, on the patch grid
    kinds: list[str]

    @property
    def grids(self) -> torch.Tensor:
        return torch.cat([self.clean, self.pseudo])

    @property
    def labels(self) -> np.ndarray:
        n = self.clean.shape[0]
        return np.concatenate([np.zeros(n, dtype=int), np.ones(self.pseudo.shape[0], dtype=int)])

    @property
    def all_masks(self) -> np.ndarray:
        return np.concatenate([np.zeros_like(self.masks), self.masks])

    @classmethod
    def build(
        cls,
        clean: torch.Tensor,
        pseudo: torch.Tensor,
        pixel_masks: np.ndarray,
        kinds: list[str],
        grid_shape: tuple[int, int],
    ) -> "HeldOutSet":
        return cls(clean, pseudo, grid_masks(pixel_masks, grid_shape), kinds)


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


def paired_comparison(local: np.ndarray, global_: np.ndarray) -> dict[str, float]:
    """Local minus global held-out negative log-likelihood per clean held-out image (each family at its own lam0):
    mean, standard error and their ratio t. Local is chosen when t < -LOCAL_STANDARD_ERRORS."""
    diff = np.asarray(local, dtype=np.float64) - np.asarray(global_, dtype=np.float64)
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.inf
    t = mean / se if se > 0 else (-math.inf if mean < 0 else math.inf if mean > 0 else 0.0)
    return {"mean_difference": mean, "standard_error": se, "t": t}


def evaluate_candidates(
    held: HeldOutSet,
    lam_grid: Sequence[float],
    global_stats: Optional[PatchStatistics],
    center: bool,
    local_model: Optional[Any],
) -> tuple[str, float, dict[str, Any], dict[str, Any]]:
    """Choose (spatial, lam_rel) on the held-out set: (spatial, lam_rel, {family: record}, {about the choice}).

    ``global_stats`` / ``local_model``: the rest fit of each family still open (None when not a candidate).

    1. Each family's held-out likelihood curve over the grid (clean held-out patches only), minimised at its
       lam0. Local is chosen if, paired over the clean held-out images, its likelihood at its lam0 beats global's
       at its lam0 by more than LOCAL_STANDARD_ERRORS standard errors (``paired_comparison``); otherwise global.
    2. lam_rel: the default ``no_evidence_lam``, unless ``select_lam``'s choice in the chosen family's window
       (the grid at or above lam0, ``lam_window``) beats it in pseudo-defect image AUROC by more than
       EVIDENCE_DEVIATIONS standard errors, paired over the held-out images (``paired_auroc_difference``); then
       that choice. Pseudo-defects are scored in the window (and at the default) only (the record's pseudo-defect
       curves are None elsewhere).
    """
    lam_grid = tuple(float(g) for g in lam_grid)
    h, w = held.masks.shape[1:]
    assert held.clean.shape[1] == h * w, "patch grids and masks disagree"
    candidates: dict[str, Any] = {}
    if global_stats is not None:
        candidates["global"] = GlobalCandidate(global_stats, center)
    if local_model is not None:
        candidates["local"] = LocalCandidate(local_model)
    if not candidates:
        raise ValueError("no candidate family to select from")
    records: dict[str, Any] = {}
    clean_rotated: dict[str, Any] = {}
    at_lam0: dict[str, np.ndarray] = {}
    for family, cand in candidates.items():
        started = time.perf_counter()
        clean_rotated[family] = cand.rotate(held.clean)
        per_image = [cand.likelihood(clean_rotated[family], lam) for lam in lam_grid]
        nll = [float(x.mean()) for x in per_image]
        best = int(np.nanargmin(np.asarray(nll, dtype=float)))
        at_lam0[family] = per_image[best]
        lam0 = lam_grid[best]
        diffs = np.stack(per_image) - per_image[best]  # (lams, n_clean): paired against lam0
        records[family] = {
            "nll": _finite_or_none(nll),
            "nll_se": _finite_or_none(diffs.std(axis=1, ddof=1) / math.sqrt(diffs.shape[1])),
            "lam0": lam0,
            "window": lam_window(lam_grid, lam0),
            "seconds": round(time.perf_counter() - started, 4),  # rotation and every lam's likelihood
        }
    paired = None
    if len(records) == 1:
        spatial = next(iter(records))
        why = "the only family open"
    else:
        paired = paired_comparison(at_lam0["local"], at_lam0["global"])
        spatial = "local" if paired["t"] < -LOCAL_STANDARD_ERRORS else "global"
        why = (
            f"held-out likelihood, local - global {paired['mean_difference']:+.4f} per dimension, "
            f"{paired['t']:+.1f} standard errors; local needs < -{LOCAL_STANDARD_ERRORS:g}"
        )
    # lam_rel: the pseudo-defects, in the chosen family's window
    started = time.perf_counter()
    cand, rec = candidates[spatial], records[spatial]
    window = rec["window"]
    if isinstance(cand, LocalCandidate):  # float32 maps: they only rank images (candidates.py)
        both = cand.concat(
            cand.as_dtype(clean_rotated.pop(spatial), torch.float32), cand.rotate(held.pseudo, torch.float32)
        )
    else:
        both = cand.concat(clean_rotated.pop(spatial), cand.rotate(held.pseudo))
    clean_rotated.clear()
    default = no_evidence_lam(lam_grid, rec["lam0"])
    maps = {lam: cand.maps(both, lam).reshape(-1, h, w) for lam in sorted(set(window) | {default})}
    del both
    in_window = select_lam(maps.__getitem__, held.labels, held.all_masks, window)
    window_best = max(in_window.image_auroc)
    best = in_window.choice

    def image_scores(lam: float) -> np.ndarray:
        return maps[lam].reshape(maps[lam].shape[0], -1).max(axis=1)

    evidence = paired_auroc_difference(image_scores(best), image_scores(default), held.labels)
    evidence = {"best": best, "default": default, **evidence}
    if evidence["z"] > EVIDENCE_DEVIATIONS:
        lam = best
        how = (
            f"{best:g}, the pseudo-defects' best in the window [{window[0]:g}, {window[-1]:g}] (image AUROC "
            f"{evidence['auroc_a']:.3f} against {evidence['auroc_b']:.3f} at the default {default:g}: "
            f"{evidence['z']:+.1f} standard errors, paired; it needs > {EVIDENCE_DEVIATIONS:g})"
        )
    else:
        lam = default
        how = (
            f"the default {default:g} ({DEFAULT_LAM_REL:g}, not below lam0): the pseudo-defects' best in the "
            f"window [{window[0]:g}, {window[-1]:g}], {best:g}, did not beat it by more than "
            f"{EVIDENCE_DEVIATIONS:g} standard error (image AUROC {evidence['auroc_a']:.3f} against "
            f"{evidence['auroc_b']:.3f}, {evidence['z']:+.1f} standard errors, paired)"
        )

    def over_grid(values: Sequence[float]) -> list[Optional[float]]:
        inside = dict(zip(window, _finite_or_none(values)))
        return [inside.get(g) for g in lam_grid]

    for family, r in records.items():
        chosen = family == spatial
        r["image_auroc"] = over_grid(in_window.image_auroc) if chosen else [None] * len(lam_grid)
        r["aupro"] = over_grid(in_window.aupro) if chosen else [None] * len(lam_grid)
        r["curve"] = over_grid(in_window.curve) if chosen else [None] * len(lam_grid)  # select_lam's criterion
        r["lam_rel"] = lam if chosen else None
    rec["window_best_auroc"] = window_best
    rec["seconds"] = round(rec["seconds"] + time.perf_counter() - started, 4)
    about = {
        "evidence": evidence,
        "paired_likelihood": paired,
        "reason": (
            f"label-free selection: spatial {spatial!r} ({why}), lam0 {rec['lam0']:g} (its likelihood's minimiser), "
            f"lam_rel {lam:g}, {how}"
        ),
    }
    return spatial, lam, records, about


class Stopwatch:
    """Adds up the seconds spent in ``with watch:`` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._start


class TrainingPart:
    """Statistics of one part of the training images (the rest, or the held-out ones) for the families open.

    With the local family open it is a LocalCRDScorer (whose pooled statistics are the global CRD's as
    well); otherwise float64 PatchStatistics on the features' device. Two parts merge into the final fit.
    """

    def __init__(self, dim: int, device: torch.device, local_factory: Optional[Callable[[], Any]] = None) -> None:
        self.local = local_factory() if local_factory is not None else None
        self.stats = PatchStatistics(dim, device=device) if self.local is None else None
        self.images = 0

    def add(self, grids: torch.Tensor) -> None:
        """Add (B, P, d) patch grids."""
        if grids.shape[0] == 0:
            return
        if self.local is not None:
            self.local.partial_fit(grids)
        else:
            self.stats.update(grids.reshape(-1, grids.shape[-1]))
        self.images += int(grids.shape[0])

    def pooled(self) -> PatchStatistics:
        """A copy of the statistics of all patches of this part (what the global CRD is fitted with)."""
        s = self.local.pooled_statistics if self.local is not None else self.stats
        return PatchStatistics.from_tensors(s.count, s.mean, s.scatter)

    def merge(self, other: "TrainingPart") -> "TrainingPart":
        """Add ``other``'s images into this part (exact for the global statistics, a sketch merge for local)."""
        if not self.images:
            self.local, self.stats = other.local, other.stats
        elif other.images:
            if self.local is not None:
                self.local.merge(other.local)
            else:
                self.stats.merge(other.stats)
            self.images += other.images
        return self
