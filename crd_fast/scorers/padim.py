"""PaDiMScorer: PaDiM's rule, a Gaussian per patch position, the baseline the position-aware CRD is measured against.

PaDiM (Defard et al., 2021) fits one Gaussian N(mu_p, C_p + eps I) to the training patches at each grid position p
(C_p their unbiased covariance, eps = 0.01 as PaDiM regularises) and scores a patch by its Mahalanobis distance
sqrt((y - mu_p)^T (C_p + eps I)^-1 (y - mu_p)). The statistics are float64 running sums (count, per-position means
and scatters, merged exactly batch by batch), so the fit streams; the model holds P d x d matrices, which is why
PaDiM reduces d first and why this baseline refuses sizes beyond ``max_bytes`` instead of exhausting memory.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.dtypes import compute_dtype
from ._validation import ArrayLike, as_patch_grids, check_real

#: PaDiM's regulariser of each position's covariance.
DEFAULT_EPS = 0.01
#: Largest size of the per-position scatters this baseline agrees to hold (P d^2 float64).
DEFAULT_MAX_BYTES = 4 << 30
#: Positions scored at once (bounds the (chunk, d, d) Cholesky factors' temporaries).
_POSITION_CHUNK = 64


class PaDiMScorer:
    """PaDiM's per-position Gaussian on (images, positions, d) patch grids; ``score`` gives (images, positions).

    Args:
        eps: added to each position's covariance (absolute, as PaDiM).
        max_bytes: refuse a fit whose P d x d float64 scatters would exceed this many bytes.
    """

    def __init__(self, eps: float = DEFAULT_EPS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.eps = check_real("eps", eps, positive=True)
        self.max_bytes = int(max_bytes)
        self._count = 0
        self._mean: Optional[torch.Tensor] = None  # (P, d) float64
        self._scatter: Optional[torch.Tensor] = None  # (P, d, d) float64
        self._factors: Optional[torch.Tensor] = None  # cached Cholesky factors of C_p + eps I

    def fit(self, grids: ArrayLike) -> "PaDiMScorer":
        """Fit on (N, P, d) normal patch grids (N >= 2), discarding any earlier fit."""
        g, _ = as_patch_grids(grids, "grids", min_images=2)
        self._count, self._mean, self._scatter = 0, None, None
        return self.partial_fit(g)

    def partial_fit(self, grids: ArrayLike) -> "PaDiMScorer":
        """Add (B, P, d) normal patch grids; any batching gives the same model (Chan's merge per position)."""
        positions = None if self._mean is None else self._mean.shape[0]
        dim = None if self._mean is None else self._mean.shape[1]
        g, _ = as_patch_grids(grids, "grids", positions=positions, dim=dim, min_images=1)
        p, d = g.shape[1], g.shape[2]
        need = p * d * d * 8
        if need > self.max_bytes:
            raise MemoryError(
                f"PaDiM's per-position covariances would take {need / 2**30:.1f} GiB ({p} positions, d = {d}); "
                f"the limit is {self.max_bytes / 2**30:.1f} GiB: reduce d (fewer or smaller layers) or raise max_bytes"
            )
        x = g.detach().to("cpu", torch.float64).transpose(0, 1)  # (P, B, d)
        n_b = x.shape[1]
        mean_b = x.mean(dim=1)
        centred = x - mean_b[:, None, :]
        scatter_b = centred.transpose(1, 2) @ centred  # (P, d, d)
        if self._mean is None:
            self._count, self._mean, self._scatter = n_b, mean_b, scatter_b
        else:
            n = self._count + n_b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n_b / n)
            self._scatter = self._scatter + scatter_b + delta[:, :, None] * delta[:, None, :] * (self._count * n_b / n)
            self._count = n
        self._factors = None
        return self

    @property
    def is_fitted(self) -> bool:
        return self._count >= 2

    @property
    def n_images(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Memory the model holds (the per-position means and covariances, float64)."""
        return 0 if self._scatter is None else (self._scatter.numel() + self._mean.numel()) * 8

    def covariance(self) -> torch.Tensor:
        """(P, d, d) unbiased per-position covariances C_p (without eps)."""
        if not self.is_fitted:
            raise RuntimeError("this PaDiMScorer is not fitted yet: call fit(grids) with at least 2 images")
        return self._scatter / (self._count - 1)

    def _cholesky(self) -> torch.Tensor:
        if self._factors is None:
            cov = self.covariance()
            eye = torch.eye(cov.shape[1], dtype=torch.float64)
            self._factors = torch.cat(
                [
                    torch.linalg.cholesky(cov[s : s + _POSITION_CHUNK] + self.eps * eye)
                    for s in range(0, len(cov), _POSITION_CHUNK)
                ]
            )
        return self._factors

    def score(self, grids: ArrayLike) -> ArrayLike:
        """Mahalanobis distances (B, P) of (B, P, d) grids; same kind and device, float64 only for float64 input."""
        factors = self._cholesky()
        y, kind = as_patch_grids(grids, "grids", positions=factors.shape[0], dim=factors.shape[1], min_images=0)
        r = (y.detach().to("cpu", torch.float64) - self._mean).transpose(0, 1)  # (P, B, d)
        z = torch.linalg.solve_triangular(factors, r.transpose(1, 2), upper=False)  # (P, d, B): L^-1 r
        out = torch.linalg.vector_norm(z, dim=1).T  # (B, P)
        return kind.wrap(out.to(device=y.device, dtype=compute_dtype(y.dtype)))

    __call__ = score

    def __repr__(self) -> str:
        fitted = "unfitted" if self._mean is None else f"P={self._mean.shape[0]}, d={self._mean.shape[1]}"
        return f"PaDiMScorer(eps={self.eps}; {fitted}, images={self._count})"


__all__ = ["DEFAULT_EPS", "PaDiMScorer"]
