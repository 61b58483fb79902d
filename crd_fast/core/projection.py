"""From patch covariance to the CRD projection.

With C the (centred or uncentred) patch covariance and lam = lam_rel * trace(C) / d,

    M_pre = lam (C + lam I)^-1 = U diag(c) U^T,   c_i = lam / (s_i + lam),   C = U diag(s) U^T,

and the CRD score of a patch y is ||M_pre (y - mu)||. This equals the ridge residual
||y - X a*|| of collaborative representation over the whole training bank (push-through identity),
without storing the bank. The rank-r form keeps the r rows of W = diag(c) U^T with the largest c_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def crd_lambda(cov: torch.Tensor, lam_rel: float) -> float:
    """lam = lam_rel * trace(C) / d: the ridge strength relative to the mean eigenvalue."""
    if not lam_rel > 0:
        raise ValueError(f"lam_rel must be positive, got {lam_rel}")
    mean_eig = float(torch.trace(cov)) / cov.shape[0]
    if not mean_eig > 0:
        raise ValueError("the fitted patches have zero variance (all identical?); CRD needs some spread")
    return lam_rel * mean_eig


@dataclass(frozen=True)
class EigenForm:
    """C = U diag(eigenvalues) U^T and the CRD shrink factors c_i = lam / (s_i + lam)."""

    eigenvalues: torch.Tensor  # (d,), ascending, clamped at 0
    eigenvectors: torch.Tensor  # (d, d), columns
    shrink: torch.Tensor  # (d,), in (0, 1], descending
    lam: float


def eigen_form(cov: torch.Tensor, lam: float) -> EigenForm:
    """Eigendecomposition of C in float64 and the shrink factors of M_pre."""
    evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
    evals = evals.clamp_min(0.0)  # rounding can leave tiny negative eigenvalues
    shrink = lam / (evals + lam)
    return EigenForm(eigenvalues=evals, eigenvectors=evecs, shrink=shrink, lam=lam)


def projection_matrix(cov: torch.Tensor, lam: float) -> torch.Tensor:
    """M_pre = lam (C + lam I)^-1, symmetric, in float64 (via the eigen form)."""
    form = eigen_form(cov, lam)
    m = (form.eigenvectors * form.shrink) @ form.eigenvectors.T
    return 0.5 * (m + m.T)


@dataclass(frozen=True)
class CRDProjection:
    """The deploy-time head: score(y) = ||matrix (y - offset)||.

    ``matrix`` is M_pre (d x d) at full rank, or the r x d top rows of W = diag(c) U^T at rank r.
    ``error_bound`` is the largest dropped shrink factor: at rank r, for every y,
    0 <= score_full(y) - score_r(y) <= error_bound * ||y - offset||. It is 0 at full rank.
    """

    matrix: torch.Tensor
    offset: torch.Tensor
    lam: float
    rank: Optional[int]
    error_bound: float

    @classmethod
    def from_covariance(
        cls, cov: torch.Tensor, offset: torch.Tensor, lam: float, rank: Optional[int] = None
    ) -> "CRDProjection":
        d = cov.shape[0]
        if rank is None or rank >= d:
            return cls(projection_matrix(cov, lam), offset, lam, None, 0.0)
        form = eigen_form(cov, lam)
        # eigh sorts eigenvalues ascending, so shrink factors descend: the first r rows matter most.
        w = form.shrink[:rank, None] * form.eigenvectors[:, :rank].T
        return cls(w.contiguous(), offset, lam, int(rank), float(form.shrink[rank]))

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])
