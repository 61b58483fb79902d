"""CRDScorer: the Collaborative Representation Distance as a small estimator object.

Fit it on normal patch features (rows of an (N, d) array), then score new patches: the score of y is
||M_pre (y - mu)||_2, the ridge residual of y over all training patches, computed from a d x d matrix.
The scorer keeps only float64 sufficient statistics (count, mean, scatter), never the patches, so its
memory is O(d^2) whatever N is, and lam_rel, center and rank can be changed after fitting.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from ..choices import DEFAULT_LAM_REL
from ..core.dtypes import compute_dtype
from ..core.finite import all_finite
from ..core.projection import CRDProjection, crd_lambda
from ..core.stats import PatchStatistics
from ..io.model_file import PathLike, read_model_file, require, write_model_file
from ..ops import native
from ._model_checks import check_state_fields, projection_mismatch
from ._validation import ArrayLike, NumericOverflowError, as_patch_matrix, check_bool, check_integer, check_real

#: Smallest accepted lam_rel. The eigen-solver resolves eigenvalues of C only to about d * eps64 * trace(C) / d
#: (eps64 = 2.2e-16); below lam_rel ~ d * eps64 the ridge lam drowns in that rounding and the shrink factors
#: lam / (s_i + lam) become noise (at 1e-300 every score is exactly 0). 1e-9 leaves a margin of 1000 for
#: d up to ~4500. See docs/DESIGN.md "Guarantees".
MIN_LAM_REL = 1e-9

#: Rows scored per chunk: bounds the temporary (chunk x d) projection to about 64 MB in float32.
_CHUNK_ELEMENTS = 1 << 24


class CRDScorer:
    """Collaborative Representation Distance scorer.

    Args:
        lam_rel: ridge strength relative to the mean eigenvalue of the patch covariance
            (lam = lam_rel * trace(C) / d). Small values approach a Mahalanobis-like distance, large
            values approach the plain distance to the mean.
        center: subtract the patch mean (True) or use the paper's uncentred second moment (False).
        rank: keep only the ``rank`` most significant rows of W = diag(c) U^T (see ``error_bound``);
            None keeps the exact full-rank M_pre.

    Inputs are (N, d) torch tensors (CPU or CUDA) or numpy arrays; ``score`` returns the same kind,
    on the same device. float64 inputs are scored in float64, all others in float32.
    """

    def __init__(self, lam_rel: float = DEFAULT_LAM_REL, center: bool = True, rank: Optional[int] = None) -> None:
        lam_rel, rank = self._check_params(lam_rel, rank)
        self._lam_rel = lam_rel
        self._center = check_bool("center", center)
        self._rank = rank
        self._stats: Optional[PatchStatistics] = None
        self._projection: Optional[CRDProjection] = None
        self._device_cache: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- parameters ---------------------------------------------------------------------------
    @staticmethod
    def _check_params(lam_rel: Any, rank: Any) -> tuple[float, Optional[int]]:
        """Validated (lam_rel, rank): Python or numpy numbers, never bool; lam_rel >= MIN_LAM_REL."""
        value = check_real("lam_rel", lam_rel, positive=True)
        if value < MIN_LAM_REL:
            raise ValueError(
                f"lam_rel={value:g} is below the floor {MIN_LAM_REL:g}: the ridge would be lost in the "
                "float64 rounding of the covariance's eigenvalues and the scores would be noise "
                "(or all 0)"
            )
        if rank is not None:
            try:
                rank = check_integer("rank", rank, 1)
            except ValueError:
                raise ValueError(f"rank must be a positive integer or None, got {rank!r}") from None
        return value, rank

    @property
    def lam_rel(self) -> float:
        return self._lam_rel

    @lam_rel.setter
    def lam_rel(self, value: float) -> None:
        self._lam_rel, _ = self._check_params(value, self._rank)
        self._invalidate()

    @property
    def center(self) -> bool:
        return self._center

    @center.setter
    def center(self, value: bool) -> None:
        self._center = check_bool("center", value)
        self._invalidate()

    @property
    def rank(self) -> Optional[int]:
        return self._rank

    @rank.setter
    def rank(self, value: Optional[int]) -> None:
        _, self._rank = self._check_params(self._lam_rel, value)
        self._invalidate()

    def _invalidate(self) -> None:
        self._projection = None
        self._device_cache.clear()

    # ---- fitting ------------------------------------------------------------------------------
    def fit(self, X: ArrayLike) -> "CRDScorer":
        """Fit on (N, d) normal patches (N >= 2), discarding any earlier fit."""
        x, _ = as_patch_matrix(X, "X", min_rows=2)
        self._stats = None
        return self.partial_fit(x)

    def partial_fit(self, X: ArrayLike) -> "CRDScorer":
        """Add (N, d) normal patches to the fit; any chunking gives the same model as one ``fit``."""
        dim = self._stats.dim if self._stats is not None else None
        x, _ = as_patch_matrix(X, "X", dim=dim, min_rows=1)
        if self._stats is None:
            self._stats = PatchStatistics(x.shape[1])
        before = (self._stats.count, self._stats.mean, self._stats.scatter)  # update() replaces, never mutates
        self._stats.update(x)
        if not (all_finite(self._stats.scatter) and all_finite(self._stats.mean)):
            self._stats.count, self._stats.mean, self._stats.scatter = before
            if before[0] == 0:
                self._stats = None
            raise NumericOverflowError(
                f"X: the patch statistics overflowed float64 (largest |value| {float(x.abs().max()):.3g}; sums of "
                "squares must stay below ~1.8e308): scale the features down"
            )
        self._invalidate()
        return self

    def merge(self, other: "CRDScorer") -> "CRDScorer":
        """Add another scorer's statistics (fitted on other patches of the same d) into this one."""
        if other._stats is None:
            return self
        if self._stats is None:
            self._stats = PatchStatistics(other._stats.dim)
        self._stats.merge(other._stats)
        self._invalidate()
        return self

    def replace_statistics(self, stats: PatchStatistics) -> "CRDScorer":
        """Make ``stats`` (e.g. combined over processes) this scorer's fit, keeping lam_rel, center and rank.

        The scorer takes ``stats`` over without copying it; the projection is recomputed on demand.
        """
        if not isinstance(stats, PatchStatistics):
            raise TypeError(f"stats must be a PatchStatistics, got {type(stats).__name__}")
        self._stats = stats
        self._invalidate()
        return self

    @classmethod
    def from_statistics(
        cls, stats: PatchStatistics, lam_rel: float = DEFAULT_LAM_REL, center: bool = True, rank: Optional[int] = None
    ) -> "CRDScorer":
        """A scorer fitted with the given float64 statistics (taken over without copying)."""
        return cls(lam_rel, center, rank).replace_statistics(stats)

    @property
    def is_fitted(self) -> bool:
        return self._stats is not None and self._stats.count >= 2

    def _require_fitted(self) -> PatchStatistics:
        if self._stats is None:
            raise RuntimeError("this CRDScorer is not fitted yet: call fit(X) first")
        if self._stats.count < 2:
            raise ValueError(f"CRD needs at least 2 training patches, got {self._stats.count}")
        return self._stats

    # ---- fitted attributes (float64, CPU) -------------------------------------------------------
    @property
    def statistics(self) -> PatchStatistics:
        """The float64 sufficient statistics (count, mean, scatter)."""
        return self._require_fitted()

    @property
    def dim(self) -> int:
        return self._require_fitted().dim

    @property
    def n_samples(self) -> int:
        return self._require_fitted().count

    @property
    def mean(self) -> torch.Tensor:
        """mu: the patch mean when centred, zeros otherwise."""
        return self.projection.offset

    @property
    def covariance(self) -> torch.Tensor:
        return self._require_fitted().covariance(self._center)

    @property
    def lam(self) -> float:
        return self.projection.lam

    @property
    def projection(self) -> CRDProjection:
        """The deploy-time head (M_pre, or rank-r W, with the offset mu), float64 on CPU."""
        if self._projection is None:
            stats = self._require_fitted()
            cov = stats.covariance(self._center)
            lam = crd_lambda(cov, self._lam_rel)
            self._projection = CRDProjection.from_covariance(cov, stats.location(self._center), lam, self._rank)
        return self._projection

    @property
    def error_bound(self) -> float:
        """At rank r: 0 <= full score - rank-r score <= error_bound * ||y - mu||; 0 at full rank."""
        return self.projection.error_bound

    # ---- scoring --------------------------------------------------------------------------------
    def _operands(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection matrix P and q = P mu in ``dtype`` on ``device``, cached."""
        key = (str(device), dtype)
        if key not in self._device_cache:
            proj = self.projection
            q = proj.matrix @ proj.offset  # float64, so the folded offset loses nothing before the cast
            self._device_cache[key] = (
                proj.matrix.to(device=device, dtype=dtype).contiguous(),
                q.to(device=device, dtype=dtype).contiguous(),
            )
        return self._device_cache[key]

    def score(self, Y: ArrayLike) -> ArrayLike:
        """CRD score ||P (y - mu)|| of every row of the (N, d) array ``Y``; same kind and device as ``Y``."""
        stats = self._require_fitted()
        y, kind = as_patch_matrix(Y, "Y", dim=stats.dim, min_rows=0)
        dtype = compute_dtype(y.dtype)
        y = y.to(dtype)
        matrix, q = self._operands(y.device, dtype)
        out = torch.empty(y.shape[0], dtype=dtype, device=y.device)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, matrix.shape[0]))
        use_native = native.has_native() and (y.device.type == "cpu" or native.has_native_cuda())
        for start in range(0, y.shape[0], chunk):
            z = y[start : start + chunk] @ matrix.T
            if use_native:
                out[start : start + chunk] = native.residual_norm(z, q)
            else:
                out[start : start + chunk] = torch.linalg.vector_norm(z - q, dim=1)
        if not bool(torch.isfinite(out).all()):  # Y was checked finite: only overflow gets here
            raise NumericOverflowError(
                f"Y: scores overflowed {str(dtype).replace('torch.', '')} "
                f"(largest |value| {float(y.abs().max()):.3g}); "
                "score in float64 or scale the features down"
            )
        return kind.wrap(out)

    __call__ = score

    # ---- persistence ------------------------------------------------------------------------------
    def state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata fields describing this fitted scorer (used by ``save`` and the detector)."""
        stats = self._require_fitted()
        proj = self.projection
        tensors = {
            f"{prefix}mean": stats.mean.cpu(),
            f"{prefix}scatter": stats.scatter.cpu(),
            f"{prefix}projection": proj.matrix.cpu(),
            f"{prefix}offset": proj.offset.cpu(),
        }
        fields = {
            "d": stats.dim,
            "n": stats.count,
            "lam": proj.lam,
            "lam_rel": self._lam_rel,
            "center": self._center,
            "rank": self._rank,
            "error_bound": proj.error_bound,
        }
        return tensors, fields

    @classmethod
    def from_state(
        cls,
        tensors: Mapping[str, torch.Tensor],
        fields: Mapping[str, Any],
        path: PathLike = "<memory>",
        prefix: str = "",
    ) -> "CRDScorer":
        """Rebuild a scorer from ``state()`` output, checking that every piece is consistent."""
        names = [f"{prefix}{k}" for k in ("mean", "scatter", "projection", "offset")]
        for name in names:
            require(name in tensors, path, f"tensor '{name}' is missing")
        mean, scatter, matrix, offset = (tensors[n] for n in names)
        d, n, lam, lam_rel, center, rank, error_bound = check_state_fields(fields, path)
        require(mean.shape == (d,) and offset.shape == (d,), path, f"mean/offset shapes do not match d={d}")
        require(scatter.shape == (d, d), path, f"scatter shape {tuple(scatter.shape)} does not match d={d}")
        r = d if rank is None else min(rank, d)
        require(matrix.shape == (r, d), path, f"projection shape {tuple(matrix.shape)}, expected {(r, d)}")
        for name, t in zip(names, (mean, scatter, matrix, offset)):
            require(t.dtype == torch.float64, path, f"tensor '{name}' is {t.dtype}, expected float64")
            require(bool(torch.isfinite(t).all()), path, f"tensor '{name}' holds NaN or Inf")
        try:
            scorer = cls(lam_rel=lam_rel, center=center, rank=rank)
        except ValueError as exc:
            require(False, path, str(exc))
        scorer._stats = PatchStatistics.from_tensors(n, mean, scatter)
        try:
            expected_lam = crd_lambda(scorer._stats.covariance(center), lam_rel)
        except ValueError as exc:
            require(False, path, f"the stored statistics are unusable: {exc}")
        require(
            math.isclose(lam, expected_lam, rel_tol=1e-9), path, f"lam={lam} but the statistics give {expected_lam}"
        )
        expected_offset = scorer._stats.location(center)
        require(torch.equal(offset, expected_offset), path, "offset does not match the stored mean and 'center'")
        stored = CRDProjection(matrix.clone(), offset.clone(), lam, scorer._rank, error_bound)
        problem = projection_mismatch(stored, scorer._stats.covariance(center))
        require(problem is None, path, f"the projection does not match the stored statistics: {problem}")
        scorer._projection = stored
        return scorer

    def save(self, path: PathLike) -> None:
        """Write the fitted scorer to ``path`` (safetensors + JSON metadata), atomically."""
        tensors, fields = self.state()
        write_model_file(path, "crd_scorer", tensors, fields, check=type(self).from_state)

    @classmethod
    def load(cls, path: PathLike) -> "CRDScorer":
        """Read a scorer written by ``save``; refuses truncated, edited or foreign files."""
        tensors, meta = read_model_file(path, "crd_scorer")
        return cls.from_state(tensors, meta, path)

    def __repr__(self) -> str:
        fitted = f"d={self._stats.dim}, n={self._stats.count}" if self._stats is not None else "unfitted"
        return f"CRDScorer(lam_rel={self._lam_rel}, center={self._center}, rank={self._rank}; {fitted})"
