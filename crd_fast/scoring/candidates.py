"""Scoring models as candidates of the label-free choice: held-out likelihood and patch scores over a lam_rel grid.

A :class:`Candidate` is what ``ScoringModel.candidate()`` returns. The built-in ones rotate patch grids into the
eigenbasis of the pooled covariance C = U diag(s) U^T, where every lam_rel of a grid is a reweighting
(docs/DESIGN.md "Label-free lam"), a few images or positions at a time, so that no (N, P, d) rotation is ever held
whole:

* :class:`GlobalCandidate`, the global CRD: score ||diag(lam / (s + lam)) z||, likelihood under N(mu, C + lam I)
  (diagonal in the eigenbasis);
* :class:`LocalCandidate`, a ``LocalCRDModel``: S_p = B + S~_p S~_p^T with B = a diag(s) (plus lam), scored through
  Woodbury and the matrix determinant lemma with (P, k)-wide products only, nothing d x d per lam.

``evaluate`` gives, for the clean held-out grids, each image's mean over its patches of the negative Gaussian
log-likelihood per dimension, 0.5 (r^T Sigma^-1 r + log det Sigma) / d (the 2 pi constant left out: it is the same
for every candidate), in float64 from float64 rotations, and their patch scores; ``maps`` the patch scores of
other grids (the pseudo-defects). Patch scores only rank images: they are float32, and ``maps`` rotates in float32
(within 2e-5 of float64, tests/test_candidates.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from ..core.lam_selection import SpectralForm
from ..core.lapack import cholesky, cholesky_inverse
from ..core.stats import PatchStatistics

#: Patches rotated at a time (bounds a candidate's temporaries: ~8 MB of float64 per d = 256).
_CHUNK_PATCHES = 4096


@dataclass(frozen=True)
class Evaluation:
    """A candidate on held-out grids at every lam_rel of a grid: ``nll`` (L, N) float64, each image's mean negative
    log-likelihood per patch and dimension, and ``maps`` (L, N, P) float32 patch scores."""

    nll: np.ndarray
    maps: np.ndarray


class Candidate(Protocol):
    """A fitted scoring model seen by the label-free choice (crd_fast/selection/choice.py).

    ``evaluate(grids, lam_grid)``: the likelihood and patch scores of (N, P, d) clean held-out grids at every lam_rel
    of the grid; ``maps(grids, lams)``: patch scores (L, N, P) of other grids (they only rank images: float32).
    """

    def evaluate(self, grids: torch.Tensor, lam_grid: Sequence[float]) -> Evaluation: ...

    def maps(self, grids: torch.Tensor, lams: Sequence[float]) -> np.ndarray: ...


def _slices(total: int, step: int) -> Iterator[slice]:
    step = max(1, step)
    for start in range(0, total, step):
        yield slice(start, start + step)


def _image_chunks(grids: torch.Tensor) -> Iterator[slice]:
    """Images of (N, P, d) grids, about _CHUNK_PATCHES patches at a time."""
    return _slices(grids.shape[0], _CHUNK_PATCHES // max(1, grids.shape[1]))


def _position_chunks(grids: torch.Tensor) -> Iterator[slice]:
    """Positions of (N, P, d) grids, about _CHUNK_PATCHES patches at a time."""
    return _slices(grids.shape[1], _CHUNK_PATCHES // max(1, grids.shape[0]))


class GlobalCandidate:
    """The global CRD of some statistics."""

    def __init__(self, stats: PatchStatistics, center: bool) -> None:
        self.form = SpectralForm.from_covariance(stats.covariance(center).cpu(), stats.location(center).cpu())
        self.eigenvalues = self.form.eigenvalues

    def _lams(self, lam_rels: Sequence[float]) -> torch.Tensor:
        return torch.tensor([float(r) for r in lam_rels], dtype=torch.float64) * self.form.mean_eigenvalue

    def _score_weights(self, lam_rels: Sequence[float]) -> torch.Tensor:
        """(d, L): c_i^2 = (lam / (s_i + lam))^2, so that a patch's squared score is z^2 . c^2."""
        lam = self._lams(lam_rels)
        return (lam[None, :] / (self.eigenvalues[:, None] + lam[None, :])).square()

    def evaluate(self, grids: torch.Tensor, lam_grid: Sequence[float]) -> Evaluation:
        """Per image: mean over patches of 0.5 (z^2 . 1 / (s + lam) + sum log (s + lam)) / d; scores ||diag(c) z||."""
        n, p, d = grids.shape
        weights = self._score_weights(lam_grid)
        sums = torch.empty(n, d, dtype=torch.float64)  # sum over each image's patches of z^2
        maps = np.empty((len(lam_grid), n, p), dtype=np.float32)
        for rows in _image_chunks(grids):
            z2 = self.form.rotate(grids[rows].cpu()).square_()  # (c, P, d) float64
            sums[rows] = z2.sum(1)
            maps[:, rows] = (z2 @ weights).sqrt_().permute(2, 0, 1).numpy()
        sigma = self.eigenvalues[None, :] + self._lams(lam_grid)[:, None]  # (L, d)
        quad = (sums @ (1.0 / sigma).T) / p  # (N, L)
        nll = 0.5 * (quad + torch.log(sigma).sum(1)[None, :]) / d
        return Evaluation(nll.T.contiguous().numpy(), maps)

    def maps(self, grids: torch.Tensor, lams: Sequence[float]) -> np.ndarray:
        """Patch scores (L, N, P), from float32 rotations: one GEMV per lam."""
        n, p, _ = grids.shape
        weights = self._score_weights(lams).float()
        mean, rotation = self.form.mean.float(), self.form.eigenvectors.float()
        out = np.empty((len(lams), n, p), dtype=np.float32)
        for rows in _image_chunks(grids):
            z2 = ((grids[rows].cpu().float() - mean) @ rotation).square_()
            out[:, rows] = (z2 @ weights).sqrt_().permute(2, 0, 1).numpy()
        return out


@dataclass(frozen=True)
class _LocalFactors:
    """Woodbury factors at one lam: B^-1 = diag(inv_b), K_p = (I + S~_p^T B^-1 S~_p)^-1, log det (S_p + lam I)."""

    lam: float
    inv_b: torch.Tensor  # (d,)
    k: torch.Tensor  # (P, k, k)
    logdet: torch.Tensor  # (P,)


class LocalCandidate:
    """A ``LocalCRDModel`` (crd_fast/core/local.py): S~_p = ``scaled_vectors`` in float64 (or float32, then the
    likelihood's products are still formed in float64 from them)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._factors: dict[float, _LocalFactors] = {}

    def factors(self, lam_rel: float) -> _LocalFactors:
        """Woodbury factors at lam_rel, float64 (kept: the likelihood and the scores of one lam share them)."""
        if lam_rel not in self._factors:
            m = self.model
            lam = m.lam(lam_rel)
            inv_b = 1.0 / (m.shrinkage * m.eigenvalues + lam)
            eye = torch.eye(m.rank, dtype=torch.float64, device=inv_b.device)
            ks, logdets = [], []
            for rows in _slices(m.positions, _CHUNK_PATCHES * 512 // (m.dim * m.rank)):  # (c, d, k) ~2M numbers
                vectors = m.scaled_vectors[rows].to(torch.float64)  # (c, d, k)
                inner = vectors.transpose(1, 2) @ (inv_b[:, None] * vectors)
                chol = cholesky(eye + 0.5 * (inner + inner.transpose(1, 2)))
                ks.append(cholesky_inverse(chol))
                # det(B + S~ S~^T) = det B det(I + S~^T B^-1 S~) (the matrix determinant lemma)
                logdets.append(2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1))
            logdet = -torch.log(inv_b).sum() + torch.cat(logdets)
            self._factors[lam_rel] = _LocalFactors(lam, inv_b, torch.cat(ks), logdet)
        return self._factors[lam_rel]

    def _rotated_by_position(self, grids: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """z = U^T (y - mu_p) of the positions ``rows`` of (N, P, d) grids, by position: (c, N, d) in ``dtype``."""
        m = self.model
        y = grids[:, rows].to(device=m.means.device, dtype=dtype) - m.means[rows].to(dtype)
        n, c, d = y.shape
        z = y.reshape(n * c, d) @ m.eigenvectors.to(dtype)
        return z.reshape(n, c, d).transpose(0, 1).contiguous()

    @staticmethod
    def _scores(z: torch.Tensor, vectors: torch.Tensor, kv: torch.Tensor, f: _LocalFactors) -> torch.Tensor:
        """(c, N) patch scores lam ||B^-1 (z - S~ K W^T z)|| from z (c, N, d), S~ (c, d, k) and K W^T z (c, N, k),
        formed directly (no expanded square to cancel) in z's dtype."""
        inv_b = f.inv_b.to(z.dtype)
        residual = torch.baddbmm(z, kv.to(z.dtype), vectors.transpose(1, 2), alpha=-1.0).mul_(inv_b)
        return f.lam * torch.linalg.vector_norm(residual, dim=-1)

    def evaluate(self, grids: torch.Tensor, lam_grid: Sequence[float]) -> Evaluation:
        """Per image: mean over patches of z^T (S_p + lam I)^-1 z = z.inv_b z - v.K v (Woodbury, v = S~^T B^-1 z)
        plus log det, over 2 d, in float64; patch scores in float32 from the same rotation."""
        m = self.model
        n, p, d = grids.shape
        factors = [self.factors(lam) for lam in lam_grid]
        total = torch.zeros(len(lam_grid), n, dtype=torch.float64)
        maps = np.empty((len(lam_grid), n, p), dtype=np.float32)
        for rows in _position_chunks(grids):
            z = self._rotated_by_position(grids, rows, torch.float64)  # (c, N, d)
            z2, z32 = z.square(), z.float()
            vectors = m.scaled_vectors[rows].to(torch.float64)
            vectors32 = vectors.float()
            for i, f in enumerate(factors):
                k = f.k[rows]
                v = torch.bmm(z * f.inv_b, vectors)  # (c, N, k): S~^T B^-1 z
                kv = torch.bmm(v, k)
                quad = z2 @ f.inv_b - (kv * v).sum(-1)  # (c, N)
                total[i] += (quad + f.logdet[rows, None]).sum(0)
                maps[i, :, rows] = self._scores(z32, vectors32, kv, f).T.cpu().numpy()
        nll = 0.5 * total / p / m.dim
        return Evaluation(nll.numpy(), maps)

    def maps(self, grids: torch.Tensor, lams: Sequence[float]) -> np.ndarray:
        """Patch scores (L, N, P), rotated and scored in float32 (they only rank images)."""
        m = self.model
        n, p, _ = grids.shape
        factors = [self.factors(lam) for lam in lams]
        out = np.empty((len(lams), n, p), dtype=np.float32)
        for rows in _position_chunks(grids):
            z = self._rotated_by_position(grids, rows, torch.float32)
            vectors = m.scaled_vectors[rows].float()
            for i, f in enumerate(factors):
                v = torch.bmm(z * f.inv_b.float(), vectors)
                kv = torch.bmm(v, f.k[rows].float())
                out[i, :, rows] = self._scores(z, vectors, kv, f).T.cpu().numpy()
        return out
