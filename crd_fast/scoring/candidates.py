"""Scoring models as candidates of the label-free choice: held-out likelihood and patch scores per lam_rel.

A :class:`Candidate` is what ``ScoringModel.candidate()`` returns. The built-in ones work on patch grids rotated
once into the eigenbasis of the pooled covariance C = U diag(s) U^T, so every lam_rel of a grid costs a
reweighting (docs/DESIGN.md "Label-free lam"):

* :class:`GlobalCandidate`, the global CRD: score ||diag(lam / (s + lam)) z||, likelihood under N(mu, C + lam I)
  (diagonal in the eigenbasis);
* :class:`LocalCandidate`, a ``LocalCRDModel``: S_p = B + S~_p S~_p^T with B = a diag(s) (plus lam), scored through
  Woodbury and the matrix determinant lemma with (P, k)-wide products only, nothing d x d per lam. Its likelihood is
  float64; its pseudo-defect maps may be float32 (``rotate(..., dtype=torch.float32)``): they only rank images.

``likelihood`` returns each image's mean over its patches of the negative Gaussian log-likelihood per dimension,
0.5 (r^T Sigma^-1 r + log det Sigma) / d (the 2 pi constant left out: it is the same for every candidate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch

from ..core.lam_selection import SpectralForm
from ..core.stats import PatchStatistics


class Candidate(Protocol):
    """A fitted scoring model seen by the label-free choice (crd_fast/selection/choice.py).

    ``rotate`` prepares the clean held-out grids once; ``likelihood`` gives, per clean image, the mean negative
    Gaussian log-likelihood per patch and dimension at a lam_rel; ``maps_input`` prepares clean and pseudo-defect
    grids together for ``maps``, the (N, P) patch scores at a lam_rel (they only rank images: a candidate may
    compute them in float32).
    """

    def rotate(self, grids: torch.Tensor) -> Any: ...

    def likelihood(self, rotated: Any, lam_rel: float) -> np.ndarray: ...

    def maps_input(self, clean_rotated: Any, pseudo_grids: torch.Tensor) -> Any: ...

    def maps(self, prepared: Any, lam_rel: float) -> np.ndarray: ...


class GlobalCandidate:
    """The global CRD of some statistics, for grids (N, P, d) rotated by :meth:`rotate`."""

    def __init__(self, stats: PatchStatistics, center: bool) -> None:
        self.form = SpectralForm.from_covariance(stats.covariance(center).cpu(), stats.location(center).cpu())
        self.eigenvalues = self.form.eigenvalues

    def rotate(self, grids: torch.Tensor) -> torch.Tensor:
        """z^2 with z = U^T (y - mu): (N, P, d) float64 (only squares enter scores and likelihood)."""
        return self.form.rotate(grids).square_()

    def maps_input(self, clean_rotated: torch.Tensor, pseudo_grids: torch.Tensor) -> torch.Tensor:
        """Clean (already rotated) and pseudo-defect grids, rotated alike, one after the other (float64)."""
        return torch.cat([clean_rotated, self.rotate(pseudo_grids)])

    def _lam(self, lam_rel: float) -> float:
        return lam_rel * self.form.mean_eigenvalue

    def maps(self, rotated: torch.Tensor, lam_rel: float) -> np.ndarray:
        """Patch scores (N, P): ||diag(c) z||^2 = z^2 . c^2 with c_i = lam / (s_i + lam): one GEMV."""
        lam = self._lam(lam_rel)
        return (rotated @ (lam / (self.eigenvalues + lam)).square()).sqrt().numpy()

    def likelihood(self, rotated: torch.Tensor, lam_rel: float) -> np.ndarray:
        """Per image (N,): mean over patches of 0.5 (z^2 . 1 / (s + lam) + sum log (s + lam)) / d."""
        sigma = self.eigenvalues + self._lam(lam_rel)
        quad = (rotated @ (1.0 / sigma)).mean(1)
        return (0.5 * (quad + torch.log(sigma).sum()) / sigma.shape[0]).numpy()


@dataclass(frozen=True)
class _LocalFactors:
    lam: float
    inv_b: torch.Tensor  # (d,): B^-1 = diag(1 / (a s + lam))
    weighted: torch.Tensor  # (P, d, k): W_p = B^-1 S~_p
    k: torch.Tensor  # (P, k, k): (I + S~^T B^-1 S~)^-1
    logdet: torch.Tensor  # (P,): log det (S_p + lam I)


@dataclass(frozen=True)
class LocalRotated:
    """Grids rotated for the local model: z^2 (N, P, d; None when rotated for ``maps`` only) and z by position
    (P, N, d)."""

    squares: Optional[torch.Tensor]
    by_position: torch.Tensor


class LocalCandidate:
    """A ``LocalCRDModel`` (crd_fast/core/local.py), for grids rotated by :meth:`rotate`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._factors: dict[float, _LocalFactors] = {}

    def rotate(self, grids: torch.Tensor, dtype: torch.dtype = torch.float64) -> LocalRotated:
        """z = U^T (y - mu_p) of (N, P, d) grids. float64: squares and z by position (the likelihood and maps);
        float32: z by position only, computed in float32 (``maps`` only: a float32 GEMM is ~2x faster)."""
        m = self.model
        grids = grids.to(m.means.device)
        if dtype == torch.float64:
            z = m.rotate(grids)  # (N, P, d) float64
            return LocalRotated(z.square(), z.transpose(0, 1).contiguous())
        z = (grids.to(dtype) - m.means.to(dtype)) @ m.eigenvectors.to(dtype)
        return LocalRotated(None, z.transpose(0, 1).contiguous())

    def maps_input(self, clean_rotated: LocalRotated, pseudo_grids: torch.Tensor) -> LocalRotated:
        """Clean (already rotated) and pseudo-defect grids for ``maps``, z by position in float32: the maps only
        rank images, and a float32 product is ~2x faster (within 2e-5 of float64, tests/test_candidates.py)."""
        clean = clean_rotated.by_position.to(torch.float32)
        pseudo = self.rotate(pseudo_grids, torch.float32).by_position
        return LocalRotated(None, torch.cat([clean, pseudo], dim=1))

    def factors(self, lam_rel: float) -> _LocalFactors:
        """Woodbury factors at lam_rel (kept: the likelihood and the scores of one lam share them)."""
        if lam_rel not in self._factors:
            m = self.model
            lam = m.lam(lam_rel)
            inv_b = 1.0 / (m.shrinkage * m.eigenvalues + lam)
            vectors = m.scaled_vectors  # (P, d, k)
            weighted = inv_b[:, None] * vectors
            inner = vectors.transpose(1, 2) @ weighted
            eye = torch.eye(m.rank, dtype=torch.float64, device=vectors.device)
            chol = torch.linalg.cholesky(eye + 0.5 * (inner + inner.transpose(1, 2)))
            # det(B + S~ S~^T) = det B det(I + S~^T B^-1 S~) (the matrix determinant lemma)
            logdet = -torch.log(inv_b).sum() + 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            self._factors[lam_rel] = _LocalFactors(lam, inv_b, weighted, torch.cholesky_inverse(chol), logdet)
        return self._factors[lam_rel]

    def maps(self, rotated: LocalRotated, lam_rel: float) -> np.ndarray:
        """Patch scores (N, P): ``LocalCRDModel.scores_rotated``'s lam ||inv_b z - W K W^T z||, formed directly
        (no expanded square to cancel) in the dtype of ``rotated`` (float32 or float64)."""
        f = self.factors(lam_rel)
        zp = rotated.by_position  # (P, N, d)
        dtype = zp.dtype
        weighted = f.weighted.to(dtype)
        kv = torch.bmm(torch.bmm(zp, weighted), f.k.to(dtype))  # (P, N, k): K W^T z
        residual = torch.baddbmm(zp * f.inv_b.to(dtype), kv, weighted.transpose(1, 2), alpha=-1.0)
        return (f.lam * torch.linalg.vector_norm(residual, dim=-1)).T.cpu().numpy()

    def likelihood(self, rotated: LocalRotated, lam_rel: float) -> np.ndarray:
        """Per image (N,): z^T (S_p + lam I)^-1 z = z.inv_b z - v.Kv (Woodbury), plus log det, over 2 d."""
        f = self.factors(lam_rel)
        v = torch.bmm(rotated.by_position, f.weighted)  # (P, N, k)
        quad = (rotated.squares @ f.inv_b).T - (torch.bmm(v, f.k) * v).sum(-1)  # (P, N)
        return (0.5 * (quad + f.logdet[:, None]).mean(0) / self.model.dim).cpu().numpy()
