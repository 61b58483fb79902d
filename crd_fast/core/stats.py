"""Running float64 statistics of patch features: count, mean and scatter matrix.

The scatter is kept about the running mean (Chan et al.'s pairwise update) rather than as a raw sum
of outer products, so the covariance does not lose digits to cancellation when the mean is large.
Two statistics objects merge exactly (up to float64 rounding), which is what partial fitting, online
updates and distributed fitting rely on.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

#: Below this many columns the BLAS call's fixed cost outweighs what the symmetric product saves.
SYRK_MIN_DIM = 64


def scatter_of(centred: torch.Tensor) -> torch.Tensor:
    """``centred.T @ centred`` for an (N, d) float64 matrix, as a symmetric (d, d) tensor.

    On the CPU this is BLAS's symmetric rank-k update (dsyrk), which forms only one triangle: half the
    multiply-adds of the general product, and it is the fit's largest cost after the backbone
    (docs/DESIGN.md "Statistics and merging"). It runs with as many BLAS threads as torch uses. Elsewhere
    (CUDA, small d) it is the plain product.
    """
    if centred.device.type != "cpu" or centred.dtype != torch.float64 or centred.shape[1] < SYRK_MIN_DIM:
        return centred.T @ centred
    from scipy.linalg.blas import dsyrk
    from threadpoolctl import threadpool_limits

    rows = centred.detach().contiguous().numpy()
    d = rows.shape[1]
    # dsyrk fills the upper triangle of a zeroed (lazily, by calloc) Fortran-ordered output in place
    out = np.zeros((d, d), dtype=np.float64, order="F")
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        # rows.T is a Fortran-ordered (d, N) view: dsyrk reads it without a copy
        out = dsyrk(1.0, rows.T, beta=0.0, c=out, trans=0, lower=0, overwrite_c=1)
    upper = torch.from_numpy(out)
    # the strictly lower triangle is zero, so upper + upper.T is the full matrix with the diagonal twice:
    # one temporary instead of triu/triu/transpose/add's three (d x d is 19 MB at d = 1536)
    full = upper + upper.T
    full.diagonal().sub_(upper.diagonal())
    return full


class PatchStatistics:
    """Sufficient statistics (n, mean, scatter) of a stream of d-dimensional patches, in float64.

    ``scatter`` is sum_i (x_i - mean)(x_i - mean)^T. Memory is O(d^2) whatever the number of patches.
    """

    def __init__(self, dim: int, device: Optional[torch.device] = None) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @classmethod
    def from_tensors(cls, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> "PatchStatistics":
        """Rebuild statistics from stored values (as saved in a model file)."""
        dim = mean.shape[0]
        if mean.shape != (dim,) or scatter.shape != (dim, dim):
            raise ValueError(
                f"inconsistent statistics shapes: mean {tuple(mean.shape)}, scatter {tuple(scatter.shape)}"
            )
        stats = cls(dim, device=mean.device)
        stats.count = int(count)
        stats.mean = mean.to(torch.float64).clone()
        stats.scatter = scatter.to(torch.float64).clone()
        return stats

    def to(self, device: torch.device) -> "PatchStatistics":
        """Move the statistics to ``device`` (in place) and return self."""
        self.mean = self.mean.to(device)
        self.scatter = self.scatter.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def update(self, x: torch.Tensor) -> "PatchStatistics":
        """Add a (N, d) batch of patches. The batch is processed in float64 on the statistics' device."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected a (N, {self.dim}) batch, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        # one float64 copy, centred in place (never the caller's tensor: copy=True even if it is float64 already)
        centred = x.to(device=self.device, dtype=torch.float64, copy=True)
        mean_b = centred.mean(dim=0)
        centred.sub_(mean_b)
        return self._merge(centred.shape[0], mean_b, scatter_of(centred), owned=True)

    def merge(self, other: "PatchStatistics") -> "PatchStatistics":
        """Add another statistics object (same d) into this one, as if its patches had been seen here."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of d={other.dim} into d={self.dim}")
        if other.count == 0:
            return self
        return self._merge(other.count, other.mean.to(self.device), other.scatter.to(self.device))

    def _merge(self, n_b: int, mean_b: torch.Tensor, scatter_b: torch.Tensor, owned: bool = False) -> "PatchStatistics":
        """Chan's pairwise update: exact for any split of the data. ``owned``: ``scatter_b`` is a fresh
        temporary that may be summed into in place. The statistics' tensors are replaced, never mutated, so
        a caller holding the old ones (to roll back an overflow) keeps them intact."""
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        total = scatter_b if owned else scatter_b.clone()
        # the weight goes into both vectors (sqrt): r_i * r_j == r_j * r_i keeps the sum exactly symmetric,
        # where alpha * x_i * y_j would round (i, j) and (j, i) differently
        root = delta * math.sqrt(n_a * n_b / n)
        total.addr_(root, root)
        total.add_(self.scatter)
        self.scatter = total
        self.mean = self.mean + delta * (n_b / n)
        self.count = n
        return self

    def covariance(self, center: bool = True) -> torch.Tensor:
        """C = (1/n) sum (x - mu)(x - mu)^T, with mu the mean if ``center`` else 0 (second moment)."""
        if self.count < 1:
            raise ValueError("no patches have been added")
        cov = self.scatter / self.count
        if not center:
            cov = cov + torch.outer(self.mean, self.mean)
        return 0.5 * (cov + cov.T)

    def location(self, center: bool = True) -> torch.Tensor:
        """The offset mu subtracted before projection: the mean, or zeros for the uncentred form."""
        return self.mean.clone() if center else torch.zeros_like(self.mean)
