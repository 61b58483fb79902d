"""Label-free choice of the detector's lam_rel and spatial model (lam_rel="auto", spatial="auto").

The fit holds out a few training images (:class:`HeldOutPlan`), fits every candidate model on the rest,
paints one pseudo-defect on each held-out image (crd_fast/synthetic/pseudo.py) and keeps the candidate that
ranks the pseudo-defect images above the clean held-out ones best (``select_lam``'s criterion: image AUROC,
plus AUPRO on the patch grid weighted 0.1 to separate near-ties). Candidates are {global, local} x lam grid,
restricted to what the options leave open. Every lam of one family costs a diagonal reweighting of patches
rotated once (crd_fast/core/lam_selection.py, crd_fast/core/local.py), so the cost is the held-out images'
extra forward passes plus one rotation per family (docs/DESIGN.md "Position-aware CRD").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..choices import DEFAULT_LAM_REL
from ..core.lam_selection import LamSelection, SpectralForm, grid_masks, select_lam
from ..core.stats import PatchStatistics
from ..synthetic.pseudo import make_pseudo_defects

#: Fewer training images than this: no hold-out, no selection (spatial "global", lam_rel DEFAULT_LAM_REL).
MIN_IMAGES = 20
#: Held-out images: min(MAX_HELD_OUT, N // 5), and at least MIN_HELD_OUT.
MAX_HELD_OUT = 24
MIN_HELD_OUT = 4
#: When the number of images is not known up front, every STREAM_STRIDE-th image is held out (up to MAX_HELD_OUT).
STREAM_STRIDE = 8

SPATIAL_FAMILIES = ("global", "local")
#: Standard deviations above chance the best candidate's held-out image AUROC must reach (``evidence_level``);
#: 0 disables the check. A trade-off measured in docs/DESIGN.md "Position-aware CRD".
EVIDENCE_DEVIATIONS = 1.0
#: What the curves hold (select_lam's criterion), as the record states it.
CRITERION = f"{LamSelection.criterion} (held-out training images)"


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
    clean: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """One pseudo-defect per normalised input of ``clean`` (H, 3, S, S), made on the de-normalised picture.

    Returns the pseudo-defect inputs normalised again with ``mean``/``std`` (H, 3, S, S) float32, their pixel
    masks (H, S, S) bool and the kinds painted. The other held-out pictures are the cut-and-paste donors.
    """
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    pictures = (clean.float().cpu() * s + m).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().numpy()
    rng = np.random.default_rng(seed)
    images, masks, kinds = make_pseudo_defects(rng, list(pictures), list(pictures))
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


def _rotated_global_scorer(
    stats: PatchStatistics, center: bool, grids: torch.Tensor, shape: tuple[int, ...]
) -> Callable[[float], np.ndarray]:
    """lam_rel -> patch maps of ``grids`` under the global CRD of ``stats``: one rotation, then reweightings."""
    form = SpectralForm.from_covariance(stats.covariance(center).cpu(), stats.location(center).cpu())
    z2 = form.rotate(grids).square_().reshape(-1, form.eigenvalues.shape[0])
    mean_eig = form.mean_eigenvalue

    def maps(lam_rel: float) -> np.ndarray:
        # ||diag(c) z||^2 = z^2 . c^2 with c_i = lam / (s_i + lam) (SpectralForm.scores): one GEMV per lam
        lam = lam_rel * mean_eig
        return (z2 @ (lam / (form.eigenvalues + lam)).square()).sqrt().reshape(shape).numpy()

    return maps


def _rotated_local_scorer(model: Any, grids: torch.Tensor, shape: tuple[int, ...]) -> Callable[[float], np.ndarray]:
    """lam_rel -> patch maps of ``grids`` under a LocalCRDModel: one rotation, then per lam two (P, k)-wide products.

    ``LocalCRDModel.scores_rotated``'s value, lam ||inv_b z - W K W^T z|| with W = inv_b S (S the model's
    ``scaled_vectors``), expanded so that nothing d-sized is formed per lam: with v = S^T (inv_b z),
    v2 = S^T (inv_b^2 z) and G = S^T diag(inv_b^2) S, the square is lam^2 (sum inv_b^2 z^2 - 2 v2.Kv + Kv.G Kv).
    """
    z = model.rotate(grids.to(model.means.device))  # (N, P, d) float64
    n, p, d = z.shape
    z2 = z.square().reshape(n * p, d)
    zp = z.transpose(0, 1).contiguous()  # (P, N, d): batched over positions
    del z
    vectors = model.scaled_vectors  # (P, d, k)
    eye = torch.eye(model.rank, dtype=torch.float64, device=vectors.device)

    def maps(lam_rel: float) -> np.ndarray:
        lam = model.lam(lam_rel)
        inv_b = 1.0 / (model.shrinkage * model.eigenvalues + lam)
        weighted = inv_b[:, None] * vectors  # W_p = B^-1 S_p
        inner = vectors.transpose(1, 2) @ weighted
        k = torch.cholesky_inverse(torch.linalg.cholesky(eye + 0.5 * (inner + inner.transpose(1, 2))))
        gram = weighted.transpose(1, 2) @ weighted  # S^T diag(inv_b^2) S
        v = torch.bmm(zp, weighted)  # (P, N, k): W^T z
        v2 = torch.bmm(zp, inv_b[:, None] * weighted)  # W^T (inv_b z)
        kv = torch.bmm(v, k)
        main = (z2 @ inv_b.square()).reshape(n, p).T  # (P, N)
        square = main - 2.0 * (v2 * kv).sum(-1) + (torch.bmm(kv, gram) * kv).sum(-1)
        return (lam * square.clamp_min(0.0).sqrt()).T.reshape(shape).cpu().numpy()

    return maps


def _finite_or_none(values: Sequence[float]) -> list[Optional[float]]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _family_record(sel: LamSelection) -> dict[str, Any]:
    curve = list(sel.curve)  # select_lam's criterion at each lam_rel
    return {
        "image_auroc": _finite_or_none(sel.image_auroc),
        "aupro": _finite_or_none(sel.aupro),
        "curve": _finite_or_none(curve),
        "lam_rel": sel.choice,
        "best": float(curve[sel.grid.index(sel.choice)]),
    }


def evaluate_candidates(
    held: HeldOutSet,
    lam_grid: Sequence[float],
    global_stats: Optional[PatchStatistics],
    center: bool,
    local_model: Optional[Any],
) -> tuple[str, float, dict[str, Any]]:
    """Score every candidate on the held-out set: (spatial, lam_rel, {family: record}).

    ``global_stats`` / ``local_model``: the rest fit of each family still open (None when not a candidate).
    The local model wins only if its best point beats global's by more than :func:`local_margin` (one more
    correctly ranked pair of held-out images): with few held-out images the curves are noisy, and the global
    model, fitted from every position's patches, is the safer choice (it is also the smaller model).
    """
    grids = held.grids
    n, p, _ = grids.shape
    shape = (n, *held.masks.shape[1:])
    assert p == shape[1] * shape[2], "patch grids and masks disagree"
    records: dict[str, Any] = {}
    best: Optional[tuple[float, str, float]] = None
    margin = local_margin(held.clean.shape[0], held.pseudo.shape[0])
    for family in SPATIAL_FAMILIES:
        started = time.perf_counter()
        if family == "global" and global_stats is not None:
            score_fn = _rotated_global_scorer(global_stats, center, grids, shape)
        elif family == "local" and local_model is not None:
            score_fn = _rotated_local_scorer(local_model, grids, shape)
        else:
            continue
        sel = select_lam(score_fn, held.labels, held.all_masks, lam_grid)
        record = _family_record(sel)
        record["seconds"] = round(time.perf_counter() - started, 4)  # rotation and every lam of this family
        records[family] = record
        value = record["best"] if math.isfinite(record["best"]) else -math.inf
        if best is None or value > best[0] + (margin if family == "local" else 1e-9):
            best = (value, family, sel.choice)
    if best is None:
        raise ValueError("no candidate family to select from")
    return best[1], best[2], records


def evidence_level(n_clean: int, n_pseudo: int) -> float:
    """The image AUROC some candidate must reach for the selection to count: chance (0.5) plus one standard
    deviation of the AUROC of n_clean vs n_pseudo images that do not differ (Mann-Whitney: sqrt((n1 + n2 + 1) /
    (12 n1 n2))); 0.67 for 6 + 6 images, 0.58 for 24 + 24. Below it no candidate told the pseudo-defects from the
    clean images and the curves are noise: the defaults are kept. (One deviation, not two: on the development
    set's real images the best held-out AUROC was 0.66 with 24 + 24 images, and the choice it made was right.)"""
    n1, n2 = max(1, n_clean), max(1, n_pseudo)
    return 0.5 + EVIDENCE_DEVIATIONS * math.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2))


def local_margin(n_clean: int, n_pseudo: int) -> float:
    """How much the local model's best criterion must exceed global's to be chosen: one ranked pair of the
    held-out images in image AUROC, 1 / (n_clean n_pseudo) (0.0625 for 4 + 4 images, 0.0017 for 24 + 24)."""
    return 1.0 / max(1, n_clean * n_pseudo)


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


def selection_table(record: dict[str, Any]) -> list[str]:
    """The record as text lines: one row per lam_rel, one column per family (the curve: select_lam's criterion)."""
    families = [f for f in SPATIAL_FAMILIES if f in record.get("families", {})]
    if not families or not record.get("grid"):
        return []
    head = f"    {'lam_rel':>8} | " + " | ".join(f"{f:>8}" for f in families)
    lines = [head]
    choice = record["choice"]
    for i, lam in enumerate(record["grid"]):
        cells = []
        for f in families:
            v = record["families"][f]["curve"][i]
            mark = "*" if (f == choice["spatial"] and lam == choice["lam_rel"]) else " "
            cells.append(f"{'-' if v is None else format(v, '.4f'):>7}{mark}")
        lines.append(f"    {lam:>8g} | " + " | ".join(cells))
    return lines


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
