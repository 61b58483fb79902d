"""Running float64 statistics of patch features: count, mean and scatter matrix.

The scatter is kept about the running mean (Chan et al.'s pairwise update) rather than as a raw sum
of outer products, so the covariance does not lose digits to cancellation when the mean is large.
Two statistics objects merge exactly (up to float64 rounding), which is what partial fitting, online
updates and distributed fitting rely on.
"""

from __future__ import annotations

from typing import Optional

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
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        # rows.T is a Fortran-ordered (d, N) view: dsyrk reads it without a copy and fills the upper triangle
        upper = torch.from_numpy(dsyrk(1.0, rows.T, trans=0, lower=0))
    return upper.triu() + upper.triu(1).T


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
        x = x.to(device=self.device, dtype=torch.float64)
        n_b = x.shape[0]
        mean_b = x.mean(dim=0)
        centred = x - mean_b
        return self._merge(n_b, mean_b, scatter_of(centred))

    def merge(self, other: "PatchStatistics") -> "PatchStatistics":
        """Add another statistics object (same d) into this one, as if its patches had been seen here."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of d={other.dim} into d={self.dim}")
        if other.count == 0:
            return self
        return self._merge(other.count, other.mean.to(self.device), other.scatter.to(self.device))

    def _merge(self, n_b: int, mean_b: torch.Tensor, scatter_b: torch.Tensor) -> "PatchStatistics":
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        # Chan's pairwise update: exact for any split of the data.
        self.scatter = self.scatter + scatter_b + torch.outer(delta, delta) * (n_a * n_b / n)
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
