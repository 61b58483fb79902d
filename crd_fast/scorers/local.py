"""LocalCRDScorer: the position-aware ("local") CRD as a small estimator object on patch grids.

Fit it on (B, P, d) grids of normal patch features (one row of P grid positions per image), then score new
grids: patch (i, p) gets || lam (S_p + lam I)^-1 (y_ip - mu_p) || with S_p = a C + (1 - a) V_p E_p V_p^T, the
per-position covariance's top-k part shrunk toward the pooled within-position covariance C (the math:
crd_fast/core/local.py and docs/DESIGN.md "Position-aware CRD").

The fit is one pass with memory independent of the number of images: per-position means, the exact pooled
statistics, and per position a Frequent Directions sketch of the centred patches (P * 2 sketch * d floats,
crd_fast/core/sketch.py). It is exact while no sketch has shrunk (always when N <= sketch images), within the
FD bound otherwise. ``partial_fit`` adds images, ``merge`` adds another scorer's statistics (distributed fits);
lam_rel, shrinkage and rank can be changed after fitting without refitting.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import torch

from ..choices import DEFAULT_LAM_REL
from ..core.dtypes import compute_dtype
from ..core.lapack import eigh
from ..core.local import DEFAULT_SKETCH, MAX_SKETCH, LocalCRDModel, LocalFactors, LocalStatistics
from ..core.stats import PatchStatistics
from ..io.model_file import PathLike, read_model_file, require, write_model_file
from ._validation import ArrayLike, NumericOverflowError, as_patch_grids, check_integer, check_real
from .crd import MIN_LAM_REL

#: Elements of the float64 (images, P, d) working set scored per chunk (about 128 MB).
_CHUNK_ELEMENTS = 1 << 24


class LocalCRDScorer:
    """Position-aware CRD scorer on (images, positions, d) patch grids.

    Args:
        lam_rel: ridge strength relative to the mean eigenvalue of the pooled covariance C
            (lam = lam_rel * trace(C) / d), as for :class:`~crd_fast.scorers.CRDScorer`.
        shrinkage: a in [0, 1]: S_p = a C + (1 - a) V_p E_p V_p^T (1: per-position means with one pooled
            covariance; 0: the per-position covariance alone).
        rank: k, the number of per-position eigenpairs kept, in [1, sketch - 1].
        sketch: ell, the Frequent Directions size per position (fixed at construction): memory
            P * 2 ell * d floats; the fit is exact for up to ell images.

    Inputs are (B, P, d) torch tensors (CPU or CUDA) or numpy arrays; ``score`` returns (B, P) of the same
    kind, on the same device: float64 for float64 input, float32 otherwise.
    """

    def __init__(
        self, lam_rel: float = DEFAULT_LAM_REL, shrinkage: float = 0.5, rank: int = 32, sketch: int = DEFAULT_SKETCH
    ) -> None:
        self._stats: Optional[LocalStatistics] = None
        self._sketch = check_integer("sketch", sketch, 2)
        if self._sketch > MAX_SKETCH:
            raise ValueError(f"sketch must be at most {MAX_SKETCH}, got {sketch!r}")
        self._lam_rel = self._check_lam_rel(lam_rel)
        self._shrinkage = self._check_shrinkage(shrinkage)
        self._rank = self._check_rank(rank)
        self._pooled_eigh: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._model: Optional[LocalCRDModel] = None
        self._device_cache: dict[str, tuple[LocalCRDModel, LocalFactors]] = {}

    # ---- parameters ---------------------------------------------------------------------------
    @staticmethod
    def _check_lam_rel(value: Any) -> float:
        lam_rel = check_real("lam_rel", value, positive=True)
        if lam_rel < MIN_LAM_REL:
            raise ValueError(
                f"lam_rel={lam_rel:g} is below the floor {MIN_LAM_REL:g}: the ridge would be lost in the float64 "
                "rounding of the covariance's eigenvalues and the scores would be noise (or all 0)"
            )
        return lam_rel

    @staticmethod
    def _check_shrinkage(value: Any) -> float:
        shrinkage = check_real("shrinkage", value)
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be a number in [0, 1], got {value!r}")
        return shrinkage

    def _check_rank(self, value: Any) -> int:
        top = self._sketch - 1
        try:
            rank = check_integer("rank", value, 1)
        except ValueError:
            rank = 0
        if not 1 <= rank <= top:
            raise ValueError(
                f"rank must be an integer in [1, sketch - 1 = {top}] (a sketch keeps sketch - 1 directions per "
                f"position after shrinking), got {value!r}"
            )
        return rank

    @property
    def lam_rel(self) -> float:
        return self._lam_rel

    @lam_rel.setter
    def lam_rel(self, value: float) -> None:
        self._lam_rel = self._check_lam_rel(value)
        self._device_cache.clear()

    @property
    def shrinkage(self) -> float:
        return self._shrinkage

    @shrinkage.setter
    def shrinkage(self, value: float) -> None:
        self._shrinkage = self._check_shrinkage(value)
        self._invalidate_model()

    @property
    def rank(self) -> int:
        return self._rank

    @rank.setter
    def rank(self, value: int) -> None:
        self._rank = self._check_rank(value)
        self._invalidate_model()

    @property
    def sketch(self) -> int:
        """ell, the Frequent Directions size per position (fixed)."""
        return self._sketch

    def _invalidate_model(self) -> None:
        """Options changed: rebuild the model on demand from the same statistics (no refit)."""
        self._model = None
        self._device_cache.clear()

    def _invalidate(self) -> None:
        """The statistics changed: everything derived from them goes."""
        self._pooled_eigh = None
        self._invalidate_model()

    # ---- fitting ------------------------------------------------------------------------------
    def fit(self, grids: ArrayLike) -> "LocalCRDScorer":
        """Fit on (B, P, d) normal patch grids (B >= 2 images), discarding any earlier fit."""
        g, _ = as_patch_grids(grids, "grids", min_images=2)
        self._stats = None
        self._invalidate()
        return self.partial_fit(g)

    def partial_fit(self, grids: ArrayLike) -> "LocalCRDScorer":
        """Add (B, P, d) normal patch grids to the fit (P and d as in earlier calls).

        Means and pooled statistics are exact for any batching; the sketches are exact while they have not
        shrunk, within the Frequent Directions bound after (crd_fast/core/sketch.py).
        """
        positions = self._stats.positions if self._stats is not None else None
        dim = self._stats.dim if self._stats is not None else None
        g, _ = as_patch_grids(grids, "grids", positions=positions, dim=dim, min_images=1)
        stats = self._stats if self._stats is not None else LocalStatistics(g.shape[1], g.shape[2], self._sketch)
        stats.update(g)  # checks overflow before changing anything
        self._stats = stats
        self._invalidate()
        return self

    def merge(self, other: "LocalCRDScorer") -> "LocalCRDScorer":
        """Add another scorer's statistics (fitted on other images, same P, d and options) into this one."""
        if not isinstance(other, LocalCRDScorer):
            raise TypeError(f"can only merge a LocalCRDScorer, got {type(other).__name__}")
        mine = (self._lam_rel, self._shrinkage, self._rank, self._sketch)
        theirs = (other._lam_rel, other._shrinkage, other._rank, other._sketch)
        if mine != theirs:
            raise ValueError(
                f"cannot merge scorers with different options: (lam_rel, shrinkage, rank, sketch) = {theirs} "
                f"into {mine}"
            )
        if other._stats is None or other._stats.images == 0:
            return self
        if self._stats is None:
            self._stats = other._stats.copy()
        else:
            ours = (self._stats.positions, self._stats.dim)
            if (other._stats.positions, other._stats.dim) != ours:
                raise ValueError(
                    f"cannot merge a scorer fitted on (P, d) = {(other._stats.positions, other._stats.dim)} into "
                    f"one fitted on {ours}"
                )
            self._stats.merge(other._stats)
        self._invalidate()
        return self

    @property
    def is_fitted(self) -> bool:
        return self._stats is not None and self._stats.images >= 2

    def _require_fitted(self) -> LocalStatistics:
        if self._stats is None:
            raise RuntimeError("this LocalCRDScorer is not fitted yet: call fit(grids) first")
        if self._stats.images < 2:
            raise ValueError(f"the local CRD needs at least 2 training images, got {self._stats.images}")
        return self._stats

    @property
    def n_images(self) -> int:
        """Training images seen so far (0 before any fit)."""
        return 0 if self._stats is None else self._stats.images

    @property
    def positions(self) -> Optional[int]:
        """P, the patch positions per image (None before any fit)."""
        return None if self._stats is None else self._stats.positions

    @property
    def dim(self) -> Optional[int]:
        """d, the feature dimension (None before any fit)."""
        return None if self._stats is None else self._stats.dim

    # ---- fitted attributes (float64, CPU) -------------------------------------------------------
    @property
    def statistics(self) -> LocalStatistics:
        """The one-pass statistics (means, pooled statistics, sketches); shared, not copied."""
        return self._require_fitted()

    @property
    def pooled_statistics(self) -> PatchStatistics:
        """Exact statistics of all training patches pooled over positions (a copy):
        ``CRDScorer.from_statistics(scorer.pooled_statistics)`` is the global CRD of the same images."""
        pooled = self._require_fitted().pooled
        return PatchStatistics.from_tensors(pooled.count, pooled.mean, pooled.scatter)

    @property
    def error_bounds(self) -> torch.Tensor:
        """(P,) bounds on || C_p - sketched C_p ||_2 (all 0 while the fit is exact)."""
        return self._require_fitted().error_bounds()

    def model(self) -> LocalCRDModel:
        """The local model (float64, CPU) for the current shrinkage and rank, built once from the statistics."""
        if self._model is None:
            stats = self._require_fitted()
            if self._pooled_eigh is None:
                self._pooled_eigh = eigh(stats.within_covariance())
            self._model = LocalCRDModel.from_statistics(stats, self._rank, self._shrinkage, self._pooled_eigh)
        return self._model

    def lam(self) -> float:
        """The absolute ridge lam = lam_rel * trace(C) / d."""
        return self.model().lam(self._lam_rel)

    # ---- scoring --------------------------------------------------------------------------------
    def _operands(self, device: torch.device) -> tuple[LocalCRDModel, LocalFactors]:
        """The model and its Woodbury factors for lam, float64 on ``device``, cached."""
        key = str(device)
        if key not in self._device_cache:
            model = self.model()
            if model.means.device != device:
                model = dataclasses.replace(
                    model,
                    means=model.means.to(device),
                    eigenvalues=model.eigenvalues.to(device),
                    eigenvectors=model.eigenvectors.to(device),
                    scaled_vectors=model.scaled_vectors.to(device),
                )
            self._device_cache[key] = (model, model.factors(model.lam(self._lam_rel)))
        return self._device_cache[key]

    def score(self, grids: ArrayLike) -> ArrayLike:
        """Scores (B, P) of (B, P, d) grids; same kind and device as ``grids``, float64 only for float64 input."""
        stats = self._require_fitted()
        y, kind = as_patch_grids(grids, "grids", positions=stats.positions, dim=stats.dim, min_images=0)
        dtype = compute_dtype(y.dtype)
        model, factors = self._operands(y.device)
        out = torch.empty(y.shape[0], y.shape[1], dtype=dtype, device=y.device)
        chunk = max(1, _CHUNK_ELEMENTS // (stats.positions * stats.dim))
        for start in range(0, y.shape[0], chunk):
            z = model.rotate(y[start : start + chunk])
            out[start : start + chunk] = model.scores_rotated(z, factors).to(dtype)
        if not bool(torch.isfinite(out).all()):  # grids were checked finite: only overflow gets here
            raise NumericOverflowError(
                f"grids: scores overflowed {str(dtype).replace('torch.', '')} "
                f"(largest |value| {float(y.abs().max()):.3g}); score in float64 or scale the features down"
            )
        return kind.wrap(out)

    __call__ = score

    # ---- persistence ------------------------------------------------------------------------------
    def state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able fields describing this fitted scorer (used by ``save`` and the detector)."""
        stats = self._require_fitted()
        tensors, fields = stats.state(prefix)
        fields = {
            **fields,
            "lam": self.lam(),
            "lam_rel": self._lam_rel,
            "shrinkage": self._shrinkage,
            "rank": self._rank,
        }
        return tensors, fields

    @classmethod
    def from_state(
        cls,
        tensors: Mapping[str, torch.Tensor],
        fields: Mapping[str, Any],
        path: PathLike = "<memory>",
        prefix: str = "",
    ) -> "LocalCRDScorer":
        """Rebuild a scorer from ``state()`` output, checking every field and tensor (ModelFileError if not)."""
        require(isinstance(fields, Mapping), path, "local scorer metadata is not a JSON object")
        for key in ("lam", "lam_rel", "shrinkage", "rank", "sketch", "images"):
            require(key in fields, path, f"metadata field {key!r} is missing")
        lam = fields["lam"]
        require(
            isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam) and lam > 0,
            path,
            f"lam={lam!r} is not a positive finite number",
        )
        try:
            scorer = cls(fields["lam_rel"], fields["shrinkage"], fields["rank"], fields["sketch"])
        except ValueError as exc:
            require(False, path, str(exc))
        try:
            stats = LocalStatistics.from_state(tensors, fields, prefix)
        except ValueError as exc:
            require(False, path, str(exc))
        require(stats.images >= 2, path, f"images={stats.images}: a fitted local scorer has at least 2")
        scorer._stats = stats
        try:
            expected = scorer.lam()
        except ValueError as exc:
            require(False, path, f"the stored statistics are unusable: {exc}")
        require(math.isclose(lam, expected, rel_tol=1e-9), path, f"lam={lam} but the statistics give {expected}")
        return scorer

    def save(self, path: PathLike) -> None:
        """Write the fitted scorer to ``path`` (safetensors + JSON metadata), atomically."""
        tensors, fields = self.state()
        write_model_file(path, "local_crd_scorer", tensors, fields, check=type(self).from_state)

    @classmethod
    def load(cls, path: PathLike) -> "LocalCRDScorer":
        """Read a scorer written by ``save``; refuses truncated, edited or foreign files."""
        tensors, meta = read_model_file(path, "local_crd_scorer")
        return cls.from_state(tensors, meta, path)

    def __repr__(self) -> str:
        if self._stats is None:
            fitted = "unfitted"
        else:
            fitted = f"P={self._stats.positions}, d={self._stats.dim}, images={self._stats.images}"
        return (
            f"LocalCRDScorer(lam_rel={self._lam_rel}, shrinkage={self._shrinkage}, rank={self._rank}, "
            f"sketch={self._sketch}; {fitted})"
        )
