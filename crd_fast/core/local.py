"""Position-aware ("local") CRD, scored exactly through Woodbury.

For aligned parts the normal look of a patch depends on its grid position p. With a mean mu_p and a
covariance C_p per position (from N training images) and the pooled within-position covariance
C = mean_p C_p, the local model shrinks C_p toward C and keeps C_p's top-k eigenpairs (V_p, E_p) only:

    S_p = a C + (1 - a) V_p E_p V_p^T,      score_p(y) = || lam (S_p + lam I)^-1 (y - mu_p) ||.

With B = a C + lam I (shared by all positions) and V~_p = V_p sqrt((1 - a) E_p), Woodbury gives

    (S_p + lam I)^-1 = B^-1 - W_p K_p W_p^T,   W_p = B^-1 V~_p (d x k),   K_p = (I + V~_p^T B^-1 V~_p)^-1 (k x k),

so a patch costs the shared d x d product u = B^-1 (y - mu_p) plus a rank-k correction (~2kd). Writing
K_p with V~_p (not D_p^-1) keeps it well defined when an eigenvalue is 0. Everything here is kept in the
eigenbasis of C = U diag(s) U^T, where B^-1 is the diagonal 1 / (a s + lam): a new lam (for the label-free
choice, crd_fast/core/lam_selection.py) then only rescales, it never refactorises a d x d matrix.

Fitting in one pass with memory independent of the number of images (:class:`LocalStatistics`):

* per-position means (P x d) and the pooled statistics (d x d): C follows exactly from the identity
  total scatter = within-position scatter + N sum_p (mu_p - mu)(mu_p - mu)^T;
* per position, a Frequent Directions sketch B_p (crd_fast/core/sketch.py, at most 2 ell - 1 rows of d) of the
  centred patches: each batch adds its rows centred at the batch mean plus one row
  sqrt(n_a n_b / n) (mu_a - mu_b) (Chan's pairwise update), so B_p^T B_p always sketches the exact scatter
  N C_p with no cancellation. C_p's top-k eigenpairs are those of B_p^T B_p / N, from the small Gram B_p B_p^T.
  Exact while no sketch has shrunk (N <= ell images always qualifies: fewer than 2 ell rows); otherwise
  || N C_p - B_p^T B_p ||_2 <= ||X_p - [X_p]_k||_F^2 / (ell - k) for every k < ell (X_p: the centred patches).
  Memory P * 2 ell * d floats.

One pass, because the features come from a backbone: a second pass would run it over every training image
again, doubling the fit's cost (the old two-pass fit in a reduced basis also lost accuracy outside the basis).
Sketches and pooled statistics merge (two statistics objects combine as if all images had been seen by one),
which gives online updates and distributed fits. When the training patches fit in memory,
:func:`local_eigenpairs_from_patches` gets the exact top-k from the N x N Gram matrix at each position instead
(the float64 reference of the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .dtypes import NumericOverflowError
from .finite import all_finite
from .lapack import eigh, inv
from .sketch import FrequentDirections
from .stats import PatchStatistics
from .threads import chunk_map

#: Default Frequent Directions size ell (directions kept per position; the buffer holds 2 ell rows of d).
DEFAULT_SKETCH = 64

# Largest values a stored state may declare (model files are checked against them).
MAX_POSITIONS = 1 << 20
MAX_DIM = 1 << 16
MAX_IMAGES = 1 << 40
MAX_SKETCH = 1 << 12


def _check_grid(x: torch.Tensor, name: str, positions: Optional[int] = None, dim: Optional[int] = None) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must be (images, positions, d), got shape {tuple(x.shape)}")
    if positions is not None and x.shape[1] != positions:
        raise ValueError(f"{name} has {x.shape[1]} positions, the model has {positions}")
    if dim is not None and x.shape[2] != dim:
        raise ValueError(f"{name} has d={x.shape[2]}, the model has d={dim}")


def _top_eigenpairs(sym: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of symmetric matrices (..., m, m): values (..., k) descending, vectors (..., m, k)."""
    evals, evecs = eigh(0.5 * (sym + sym.transpose(-1, -2)))
    k = min(k, sym.shape[-1])
    vals = evals[..., -k:].flip(-1).clamp_min(0.0)  # rounding can leave tiny negative eigenvalues
    vecs = evecs[..., -k:].flip(-1)
    return vals, vecs


class LocalStatistics:
    """One-pass, mergeable statistics of the local model: per-position means, the pooled statistics, and one
    Frequent Directions sketch of the centred patches per position.

    Patches come as (B, P, d) grids, one row of P positions per image. Memory: P * d (means) + d^2 (pooled)
    + P * 2 ell * d (sketches), independent of the number of images. See the module docstring.
    """

    def __init__(self, positions: int, dim: int, sketch: int = DEFAULT_SKETCH, device: Optional[torch.device] = None):
        if positions <= 0 or dim <= 0:
            raise ValueError(f"positions and dim must be positive, got {positions} and {dim}")
        self.positions, self.dim = int(positions), int(dim)
        self.images = 0
        self.means = torch.zeros(positions, dim, dtype=torch.float64, device=device)
        self.pooled = PatchStatistics(dim, device=device)
        # float32 until float64 grids arrive (crd_fast/core/sketch.py "Storage precision")
        self.fd = FrequentDirections(self.positions, self.dim, sketch, device=device, dtype=torch.float32)

    @property
    def sketch(self) -> int:
        """ell: directions kept per position (the buffer holds up to 2 ell - 1 rows)."""
        return self.fd.ell

    @property
    def device(self) -> torch.device:
        return self.means.device

    def update(self, grids: torch.Tensor) -> "LocalStatistics":
        """Add a (B, P, d) batch of patch grids (one pass; any batching gives the same means and pooled statistics,
        and sketches within the FD bound)."""
        _check_grid(grids, "grids", self.positions, self.dim)
        g = grids.to(device=self.device)
        b = g.shape[0]
        if b == 0:
            return self
        if not all_finite(g):
            raise ValueError("grids contain NaN or Inf")
        # the statistics take their own float64 copy; the sketch rows are centred in float64 and, for float32
        # features, stored in float32 (crd_fast/core/sketch.py "Storage precision"). The pooled statistics are
        # updated in a copy (Chan's update of the batch's own, as a merge of them would be), so an overflow
        # leaves these statistics as they were.
        pooled = PatchStatistics.from_tensors(self.pooled.count, self.pooled.mean, self.pooled.scatter)
        pooled.update(g.reshape(-1, self.dim))
        if not all_finite(pooled.scatter):
            raise NumericOverflowError(
                f"grids: the patch statistics overflowed float64 (largest |value| {float(g.abs().max()):.3g}): "
                "scale the features down"
            )
        batch_mean = _batch_mean(g)
        # one image centred at itself is a zero row: none is appended
        return self._absorb(b, batch_mean, pooled, batch=g if b > 1 else None, precise=g.dtype == torch.float64)

    def merge(self, other: "LocalStatistics") -> "LocalStatistics":
        """Add statistics of other images (same P, d and sketch size) into these, as if they had been seen here."""
        if not isinstance(other, LocalStatistics):
            raise TypeError(f"can only merge LocalStatistics, got {type(other).__name__}")
        if (other.positions, other.dim, other.sketch) != (self.positions, self.dim, self.sketch):
            raise ValueError(
                f"cannot merge local statistics of (P, d, sketch) = {(other.positions, other.dim, other.sketch)} "
                f"into {(self.positions, self.dim, self.sketch)}"
            )
        if other.images == 0:
            return self
        pooled = PatchStatistics.from_tensors(self.pooled.count, self.pooled.mean, self.pooled.scatter)
        pooled.merge(other.pooled)
        if not all_finite(pooled.scatter):
            raise NumericOverflowError("the pooled patch statistics overflowed float64: scale the features down")
        return self._absorb(other.images, other.means, pooled, sketch=other.fd, precise=False)

    def _absorb(
        self,
        n_b: int,
        means_b: torch.Tensor,
        pooled: PatchStatistics,
        batch: Optional[torch.Tensor] = None,
        sketch: Optional[FrequentDirections] = None,
        precise: bool = True,
    ) -> "LocalStatistics":
        """Add n_b images with per-position means ``means_b`` and their centred scatter as the (n_b, P, d)
        ``batch`` itself (its rows centred at ``means_b`` go into the sketch) or a ``sketch``; ``pooled``: the
        pooled statistics with them (checked for overflow by the caller, before anything changed). Chan's pairwise
        update per position, scatter = S_a + S_b + (n_a n_b / n) delta delta^T, puts the last term in as one more
        sketch row, so the sketches always hold centred data (no cancellation). ``precise``: the images were
        float64 (their rows make the sketch float64); else rows go in at the sketch's precision."""
        n_a = self.images
        n = n_a + n_b
        delta = means_b.to(device=self.device, dtype=torch.float64) - self.means
        if precise:
            self.fd.promote(torch.float64)
        if sketch is not None:
            self.fd.merge(sketch)
        if batch is not None:
            self.fd.append_centred(batch, means_b)
        if n_a > 0:
            self.fd.append((delta * (n_a * n_b / n) ** 0.5)[:, None, :], narrow=True)
        self.means = self.means + delta * (n_b / n)
        self.pooled = pooled
        self.images = n
        return self

    def copy(self) -> "LocalStatistics":
        """An independent copy."""
        tensors, fields = self.state()
        return LocalStatistics.from_state({k: v.clone() for k, v in tensors.items()}, fields)

    def within_covariance(self) -> torch.Tensor:
        """C = (1/(N P)) sum_p sum_i (x_ip - mu_p)(x_ip - mu_p)^T = mean_p C_p, exactly, from the pooled statistics."""
        return within_covariance(self.pooled, self.means)

    def error_bounds(self) -> torch.Tensor:
        """(P,) bounds on || C_p - B_p^T B_p / N ||_2 (0 while no sketch has shrunk; see crd_fast/core/sketch.py)."""
        if self.images < 1:
            raise ValueError("no patch grids have been added")
        return self.fd.discarded / self.images

    def local_eigenpairs(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``rank`` eigenpairs of the sketched C_p ~= B_p^T B_p / N: values (P, k) descending, vectors (P, d, k).

        k = min(rank, d); directions the sketch does not hold (fewer rows than k) come as zero values and zero
        vectors, which the local model ignores. Exact (to rounding) while no sketch has shrunk.
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if self.images < 1:
            raise ValueError("no patch grids have been added")
        k = min(rank, self.dim)
        vals = torch.zeros(self.positions, k, dtype=torch.float64, device=self.device)
        vecs = torch.zeros(self.positions, self.dim, k, dtype=torch.float64, device=self.device)

        def fill(index: int) -> None:
            found = self.chunk_eigenpairs(k, index)
            if found is not None:
                start = self.fd.chunk_slices()[index].start
                v, u = found
                vals[start : start + v.shape[0], : v.shape[1]] = v
                vecs[start : start + v.shape[0], :, : v.shape[1]] = u

        chunk_map(fill, range(len(self.fd.chunk_slices())), vals)
        return vals, vecs

    def chunk_eigenpairs(
        self, rank: int, index: int, within: slice = slice(None)
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``local_eigenpairs`` of the positions of the sketch's ``index``-th chunk (``fd.chunk_slices()``), float64
        whatever the sketch's precision: values (c, k') and vectors (c, d, k') with k' = min(rank, rows held), so the
        (P, d, k) vectors need not all be in memory at once; ``within``: only those positions of the chunk (counted
        from its start), so that only their rows are copied to float64. None when the sketch holds no rows."""
        if self.fd.filled == 0:
            return None
        return _gram_eigenpairs(self.fd.chunk_rows(index)[within].to(torch.float64), self.images, rank)

    # -- persistence --------------------------------------------------------------------------------
    def state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (float64, CPU) and JSON-able fields that :meth:`from_state` rebuilds these statistics from."""
        tensors = {
            f"{prefix}means": self.means.cpu(),
            f"{prefix}pooled_mean": self.pooled.mean.cpu(),
            f"{prefix}pooled_scatter": self.pooled.scatter.cpu(),
            f"{prefix}sketch_rows": self.fd.rows().to(device="cpu", dtype=torch.float64, copy=True),
            f"{prefix}sketch_discarded": self.fd.discarded.cpu(),
        }
        fields = {
            "positions": self.positions,
            "d": self.dim,
            "images": self.images,
            "sketch": self.sketch,
            "sketch_shrinks": self.fd.shrinks,
        }
        return tensors, fields

    @classmethod
    def from_state(
        cls, tensors: Mapping[str, torch.Tensor], fields: Mapping[str, Any], prefix: str = ""
    ) -> "LocalStatistics":
        """Rebuild statistics from :meth:`state` output; ValueError naming the first inconsistency."""
        for key in ("positions", "d", "images", "sketch", "sketch_shrinks"):
            if key not in fields:
                raise ValueError(f"field {key!r} is missing")
        p, d, n, ell, shrinks = (fields[k] for k in ("positions", "d", "images", "sketch", "sketch_shrinks"))
        for key, value, low, high in (
            ("positions", p, 1, MAX_POSITIONS),
            ("d", d, 1, MAX_DIM),
            ("images", n, 0, MAX_IMAGES),
            ("sketch", ell, 2, MAX_SKETCH),
            ("sketch_shrinks", shrinks, 0, MAX_IMAGES),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{key}={value!r} is not an integer in [{low}, {high}]")
        names = ("means", "pooled_mean", "pooled_scatter", "sketch_rows", "sketch_discarded")
        for name in names:
            if f"{prefix}{name}" not in tensors:
                raise ValueError(f"tensor '{prefix}{name}' is missing")
        means, pmean, pscatter, rows, discarded = (tensors[f"{prefix}{name}"] for name in names)
        for name, t in zip(names, (means, pmean, pscatter, rows, discarded)):
            if t.dtype != torch.float64:
                raise ValueError(f"tensor '{prefix}{name}' is {t.dtype}, expected float64")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"tensor '{prefix}{name}' holds NaN or Inf")
        expected = {
            "means": (p, d),
            "pooled_mean": (d,),
            "pooled_scatter": (d, d),
            "sketch_discarded": (p,),
        }
        for name, t in zip(names, (means, pmean, pscatter, rows, discarded)):
            if name in expected and tuple(t.shape) != expected[name]:
                raise ValueError(f"tensor '{prefix}{name}' has shape {tuple(t.shape)}, expected {expected[name]}")
        if rows.ndim != 3 or rows.shape[0] != p or rows.shape[2] != d or rows.shape[1] >= 2 * ell:
            raise ValueError(
                f"tensor '{prefix}sketch_rows' has shape {tuple(rows.shape)}, expected (P={p}, m < {2 * ell}, d={d})"
            )
        if bool((discarded < 0).any()) or (shrinks == 0 and bool((discarded != 0).any())):
            raise ValueError("the sketch's discarded mass must be >= 0, and 0 when it never shrank")
        if n > 0:
            spread = float(pscatter.diagonal().clamp_min(0).max()) / (n * p)
            scale = float(means.abs().max()) + spread**0.5  # rounding of the means is relative to both
            if not torch.allclose(means.mean(0), pmean, rtol=1e-9, atol=1e-9 * scale):
                raise ValueError("the pooled mean is not the mean of the per-position means")
            scale = float(pscatter.diagonal().abs().max())
            if float((pscatter - pscatter.T).abs().max()) > 1e-9 * max(scale, 1e-300):
                raise ValueError("the pooled scatter is not symmetric")
        elif bool(means.any()) or bool(pmean.any()) or bool(pscatter.any()) or rows.shape[1] != 0:
            raise ValueError("statistics of 0 images must be all zero")
        stats = cls(p, d, ell)
        stats.images = n
        stats.means = means.clone()
        stats.pooled = PatchStatistics.from_tensors(n * p, pmean, pscatter)
        stats.fd = FrequentDirections.from_rows(rows, discarded, ell, shrinks)
        return stats


def _batch_mean(grids: torch.Tensor) -> torch.Tensor:
    """The (P, d) float64 mean of (B, P, d) grids, summed image by image: B adds of a (P, d) float64 accumulator,
    7x faster than torch's reduction over the first dimension with a dtype change (4 ms against 28 ms for 7 images
    of 784 x 1536)."""
    total = grids[0].to(torch.float64, copy=True)
    for image in grids[1:]:
        total.add_(image)
    return total.div_(grids.shape[0])


def within_covariance(pooled: PatchStatistics, means: torch.Tensor) -> torch.Tensor:
    """The pooled within-position covariance C = mean_p C_p of N images, exactly, from the statistics of all their
    patches (``pooled``, N P of them) and the per-position means (P, d): within scatter = total scatter -
    N sum_p (mu_p - mu)(mu_p - mu)^T."""
    positions = means.shape[0]
    if pooled.count < 1 or pooled.count % positions:
        raise ValueError(f"no patch grids have been added, or {pooled.count} patches are not whole grids")
    between = means.to(torch.float64) - pooled.mean
    within = pooled.scatter - (pooled.count // positions) * (between.T @ between)
    cov = within / pooled.count
    return 0.5 * (cov + cov.T)


def _gram_eigenpairs(rows: torch.Tensor, count: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of R_p^T R_p / count from rows R (P, m, d), through the m x m Gram: values (P, k)
    descending, vectors (P, d, k) with k = min(rank, m); a zero eigenvalue gets a zero vector."""
    gram = rows @ rows.transpose(1, 2) / count  # same non-zero eigenvalues as R^T R / count
    vals, vecs = _top_eigenpairs(gram, rank)
    # R^T R v = count e v  <=>  v = R^T g / sqrt(count e) for a Gram eigenvector g.
    scale = torch.where(vals > 0, 1.0 / torch.sqrt(count * vals.clamp_min(1e-300)), torch.zeros_like(vals))
    return vals, rows.transpose(1, 2) @ vecs * scale[:, None, :]


def local_eigenpairs_from_patches(grids: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact per-position means and top-``rank`` eigenpairs of C_p from (N, P, d) patch grids in memory.

    Uses the N x N Gram matrix at each position (C_p has rank <= N - 1). Returns means (P, d),
    values (P, k) descending and vectors (P, d, k), in float64.
    """
    _check_grid(grids, "grids")
    x = grids.to(torch.float64)
    n = x.shape[0]
    if n < 1:
        raise ValueError("no patch grids given")
    means = x.mean(dim=0)
    xc = (x - means).permute(1, 0, 2)  # (P, N, d)
    gram = xc @ xc.transpose(1, 2) / n  # (P, N, N): same non-zero eigenvalues as C_p
    vals, vecs = _top_eigenpairs(gram, rank)
    # C_p v = e v  <=>  v = X_p^T g / sqrt(N e) for a Gram eigenvector g; a zero eigenvalue gives a zero vector.
    scale = torch.where(vals > 0, 1.0 / torch.sqrt(n * vals.clamp_min(1e-300)), torch.zeros_like(vals))
    v = xc.transpose(1, 2) @ vecs * scale[:, None, :]
    return means, vals, v


@dataclass(frozen=True)
class LocalFactors:
    """Woodbury factors for one lam, in the eigenbasis of C: B^-1 = diag(inv_b), W_p = inv_b * V~_p, K_p."""

    lam: float
    inv_b: torch.Tensor  # (d,)
    w: torch.Tensor  # (P, d, k)
    k: torch.Tensor  # (P, k, k)


@dataclass(frozen=True)
class LocalCRDModel:
    """The local CRD model, stored in the eigenbasis of the pooled covariance C = U diag(s) U^T.

    ``scaled_vectors`` are U^T V_p sqrt((1 - a) E_p), shape (P, d, k). ``mean_eigenvalue`` is trace(C)/d:
    lam = lam_rel * mean_eigenvalue, as for the global CRD.
    """

    means: torch.Tensor  # (P, d)
    eigenvalues: torch.Tensor  # (d,) of C, clamped at 0
    eigenvectors: torch.Tensor  # (d, d) U
    scaled_vectors: torch.Tensor  # (P, d, k)
    shrinkage: float  # a

    @classmethod
    def build(
        cls,
        means: torch.Tensor,
        pooled_cov: torch.Tensor,
        local_values: torch.Tensor,
        local_vectors: torch.Tensor,
        shrinkage: float,
        pooled_eigh: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> "LocalCRDModel":
        """From mu_p (P, d), C (d, d), E_p (P, k) and V_p (P, d, k) (original basis) and the shrinkage a.

        ``pooled_eigh``: C's (eigenvalues, eigenvectors) when already computed (the d x d eigh is the
        fit's most expensive step; models that share C can share it).
        """
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        p, d = means.shape
        if pooled_cov.shape != (d, d):
            raise ValueError(f"pooled covariance must be ({d}, {d}), got {tuple(pooled_cov.shape)}")
        if (
            local_vectors.ndim != 3
            or local_vectors.shape[:2] != (p, d)
            or local_values.shape != (p, local_vectors.shape[2])
        ):
            raise ValueError(
                f"local eigenpairs must be (P={p}, k) values and (P={p}, d={d}, k) vectors, got "
                f"{tuple(local_values.shape)} and {tuple(local_vectors.shape)}"
            )
        evals, evecs = eigh(pooled_cov.to(torch.float64)) if pooled_eigh is None else pooled_eigh
        evals, evecs = evals.to(torch.float64).clamp_min(0.0), evecs.to(torch.float64)
        scale = torch.sqrt((1.0 - shrinkage) * local_values.to(torch.float64).clamp_min(0.0))
        rotated = torch.einsum("de,pdk->pek", evecs, local_vectors.to(torch.float64)) * scale[:, None, :]
        return cls(means.to(torch.float64), evals, evecs, rotated.contiguous(), float(shrinkage))

    @classmethod
    def from_statistics(
        cls,
        stats: "LocalStatistics",
        rank: int,
        shrinkage: float,
        pooled_eigh: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        dtype: torch.dtype = torch.float64,
        group: Optional[int] = None,
    ) -> "LocalCRDModel":
        """``build`` from one-pass statistics, a chunk of positions at a time: the (P, d, k) local vectors are
        rotated into C's eigenbasis as they come out of the sketch, so only ``scaled_vectors`` (P, d, k) is held
        whole (``build`` holds the vectors, their rotation and its temporaries). The same model to rounding.

        ``dtype``: of ``scaled_vectors`` and of the product that rotates them, float64 (the model the detector
        scores with) or float32 (a candidate of the label-free choice, which only compares and ranks:
        crd_fast/scoring/candidates.py); the eigenpairs themselves are float64 either way. ``group``: positions
        whose eigenpairs are found and rotated at a time (None: a sketch chunk's, ~50 at d = 1536, whose float64
        rows, vectors and rotation take ~170 MB per task); fewer take less memory, the same model to rounding
        (batched products of another size round differently).
        """
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the local model is float64 or float32, not {dtype}")
        cov = stats.within_covariance()
        evals, evecs = eigh(cov) if pooled_eigh is None else pooled_eigh
        evals, evecs = evals.to(torch.float64).clamp_min(0.0), evecs.to(torch.float64)
        k = min(int(rank), stats.dim)
        rotation = evecs.to(dtype).T.contiguous()  # U^T
        scaled = torch.zeros(stats.positions, stats.dim, k, dtype=dtype, device=stats.device)

        chunks = stats.fd.chunk_slices()

        def rotate(index: int) -> None:
            size = chunks[index].stop - chunks[index].start
            step = size if group is None else max(1, int(group))
            for first in range(0, size, step):
                within = slice(first, min(first + step, size))
                found = stats.chunk_eigenpairs(k, index, within)
                if found is None:
                    return
                start = chunks[index].start + first
                values, vectors = found
                scale = torch.sqrt((1.0 - shrinkage) * values.clamp_min(0.0))  # (c, k')
                c, kk = values.shape
                # U^T [V_p ...]: one (d x d)(d x c k') product per group of positions
                flat = vectors.to(dtype).transpose(0, 1).reshape(stats.dim, c * kk)
                rotated = (rotation @ flat).reshape(stats.dim, c, kk).transpose(0, 1)
                scaled[start : start + c, :, :kk] = rotated * scale.to(dtype)[:, None, :]

        chunk_map(rotate, range(len(chunks)), scaled)
        return cls(stats.means, evals, evecs, scaled, float(shrinkage))

    @property
    def positions(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def rank(self) -> int:
        return int(self.scaled_vectors.shape[2])

    @property
    def mean_eigenvalue(self) -> float:
        return float(self.eigenvalues.sum()) / self.dim

    def lam(self, lam_rel: float) -> float:
        if not lam_rel > 0:
            raise ValueError(f"lam_rel must be positive, got {lam_rel}")
        if not self.mean_eigenvalue > 0:
            raise ValueError("the fitted patches have zero variance (all identical?); CRD needs some spread")
        return lam_rel * self.mean_eigenvalue

    def factors(self, lam: float) -> LocalFactors:
        """W_p and K_p for an absolute lam (> 0), in the eigenbasis."""
        if not lam > 0:
            raise ValueError(f"lam must be positive, got {lam}")
        inv_b = 1.0 / (self.shrinkage * self.eigenvalues + lam)
        w = inv_b[None, :, None] * self.scaled_vectors
        inner = self.scaled_vectors.transpose(1, 2) @ w  # V~^T B^-1 V~, (P, k, k)
        eye = torch.eye(self.rank, dtype=torch.float64, device=w.device)
        k = inv(eye + 0.5 * (inner + inner.transpose(1, 2)))
        return LocalFactors(float(lam), inv_b, w.contiguous(), 0.5 * (k + k.transpose(1, 2)))

    def rotate(self, grids: torch.Tensor) -> torch.Tensor:
        """z = U^T (y - mu_p) for (N, P, d) patch grids, float64: computed once, reused for every lam."""
        _check_grid(grids, "grids", self.positions, self.dim)
        return (grids.to(torch.float64) - self.means) @ self.eigenvectors

    def scores_rotated(self, z: torch.Tensor, factors: LocalFactors) -> torch.Tensor:
        """Scores (N, P) of rotated patches z (N, P, d) for the factors' lam."""
        u = z * factors.inv_b
        t = torch.einsum("npd,pdk->npk", z, factors.w)  # W_p^T (y - mu_p) in the eigenbasis
        t = torch.einsum("npk,pkj->npj", t, factors.k)
        corr = torch.einsum("npk,pdk->npd", t, factors.w)
        return factors.lam * torch.linalg.vector_norm(u - corr, dim=-1)

    def scores(self, grids: torch.Tensor, lam_rel: float) -> torch.Tensor:
        """Scores (N, P) of (N, P, d) patch grids at lam = lam_rel * trace(C) / d."""
        return self.scores_rotated(self.rotate(grids), self.factors(self.lam(lam_rel)))

    def deploy_form(self, lam_rel: float) -> dict[str, torch.Tensor]:
        """The head in the original basis: score = || m (y - mu_p) - lam W_p K_p W_p^T (y - mu_p) ||.

        ``matrix`` = lam B^-1 (d x d, shared), ``offsets`` = mu_p (P, d), ``w`` = W_p (P, d, k) and
        ``k`` = lam K_p (P, k, k), all float64.
        """
        f = self.factors(self.lam(lam_rel))
        u = self.eigenvectors
        matrix = (u * (f.lam * f.inv_b)) @ u.T
        w = torch.einsum("de,pek->pdk", u, f.w)
        return {"matrix": 0.5 * (matrix + matrix.T), "offsets": self.means, "w": w.contiguous(), "k": f.lam * f.k}


def score_deploy_form(form: dict[str, torch.Tensor], grids: torch.Tensor) -> torch.Tensor:
    """Scores (N, P) of (N, P, d) grids with :meth:`LocalCRDModel.deploy_form` (the per-patch work of a head)."""
    r = grids.to(torch.float64) - form["offsets"]
    main = r @ form["matrix"]
    t = torch.einsum("npd,pdk->npk", r, form["w"])
    corr = torch.einsum("npk,pkj,pdj->npd", t, form["k"], form["w"])
    return torch.linalg.vector_norm(main - corr, dim=-1)
