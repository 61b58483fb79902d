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
for every candidate), and their patch scores at every lam of a grid; ``maps`` the patch scores of other grids (the
pseudo-defects). Precision: the grids (float32 features) are rotated in float32 and the local model's S~ may be
float32 (its rotation is the largest product of the choice); every sum and product after the rotation that enters
the likelihood is float64, so nothing cancels in float32, and the likelihood is within 1e-5 (relative) of an
all-float64 computation (tests/test_candidates.py): the choice compares likelihoods whose differences are
thousands of times larger. Patch scores only rank images: float32 throughout (within 2e-5 of float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from ..core.lam_selection import SpectralForm
from ..core.lapack import cholesky, cholesky_inverse
from ..core.stats import PatchStatistics
from ..core.threads import chunk_map

#: Patches rotated at a time: one task of crd_fast/core/threads.py's chunk_map (~6 MB of float32 at d = 1536).
_CHUNK_PATCHES = 1024
#: Numbers in the local candidate's largest per-piece temporary, W for every lam (c, d, L k) (16 MB of float64).
_PIECE_NUMBERS = 2 << 20


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
    """Images of (N, P, d) grids, about _CHUNK_PATCHES patches at a time (one task each)."""
    return _slices(grids.shape[0], _CHUNK_PATCHES // max(1, grids.shape[1]))


def _task_chunks(grids: torch.Tensor) -> Iterator[slice]:
    """Positions of (N, P, d) grids, about _CHUNK_PATCHES patches at a time (one task each)."""
    return _slices(grids.shape[1], _CHUNK_PATCHES // max(1, grids.shape[0]))


class GlobalCandidate:
    """The global CRD of some statistics. Grids are rotated in float32; the likelihood sums their squares in float64
    (all positive: nothing cancels)."""

    def __init__(self, stats: PatchStatistics, center: bool) -> None:
        self.form = SpectralForm.from_covariance(stats.covariance(center).cpu(), stats.location(center).cpu())
        self.eigenvalues = self.form.eigenvalues
        self._mean32, self._rotation32 = self.form.mean.float(), self.form.eigenvectors.float()

    def _lams(self, lam_rels: Sequence[float]) -> torch.Tensor:
        return torch.tensor([float(r) for r in lam_rels], dtype=torch.float64) * self.form.mean_eigenvalue

    def _score_weights(self, lam_rels: Sequence[float]) -> torch.Tensor:
        """(d, L) float32: c_i^2 = (lam / (s_i + lam))^2, so that a patch's squared score is z^2 . c^2."""
        lam = self._lams(lam_rels)
        return (lam[None, :] / (self.eigenvalues[:, None] + lam[None, :])).square().float()

    def _squares(self, grids: torch.Tensor, rows: slice) -> torch.Tensor:
        """z^2 of the images ``rows`` (c, P, d) float32, z = U^T (y - mu) rotated in float32."""
        return ((grids[rows].cpu().float() - self._mean32) @ self._rotation32).square_()

    def evaluate(self, grids: torch.Tensor, lam_grid: Sequence[float]) -> Evaluation:
        """Per image: mean over patches of 0.5 (z^2 . 1 / (s + lam) + sum log (s + lam)) / d; scores ||diag(c) z||."""
        n, p, d = grids.shape
        weights = self._score_weights(lam_grid)
        sums = torch.empty(n, d, dtype=torch.float64)  # sum over each image's patches of z^2
        maps = np.empty((len(lam_grid), n, p), dtype=np.float32)

        def task(rows: slice) -> None:
            z2 = self._squares(grids, rows)
            sums[rows] = z2.sum(1, dtype=torch.float64)
            maps[:, rows] = (z2 @ weights).sqrt_().permute(2, 0, 1).numpy()

        chunk_map(task, list(_image_chunks(grids)), grids)
        sigma = self.eigenvalues[None, :] + self._lams(lam_grid)[:, None]  # (L, d)
        quad = (sums @ (1.0 / sigma).T) / p  # (N, L)
        nll = 0.5 * (quad + torch.log(sigma).sum(1)[None, :]) / d
        return Evaluation(nll.T.contiguous().numpy(), maps)

    def maps(self, grids: torch.Tensor, lams: Sequence[float]) -> np.ndarray:
        """Patch scores (L, N, P): one GEMV per lam."""
        n, p, _ = grids.shape
        weights = self._score_weights(lams)
        out = np.empty((len(lams), n, p), dtype=np.float32)

        def task(rows: slice) -> None:
            out[:, rows] = (self._squares(grids, rows) @ weights).sqrt_().permute(2, 0, 1).numpy()

        chunk_map(task, list(_image_chunks(grids)), grids)
        return out


class LocalCandidate:
    """A ``LocalCRDModel`` (crd_fast/core/local.py) whose ``scaled_vectors`` S~_p may be float32 (the detector's
    candidate, ``LocalCRDModel.from_statistics(..., dtype=float32)``) or float64.

    Every lam of a grid is handled in the same products: for a chunk of positions, W_l = B_l^-1 S~_p for all L
    lams side by side is one (d, L k) matrix, so S~^T W (the Woodbury inner matrices) and z^T W (W^T z of every
    patch) are one product each instead of 2 L small ones.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._rotation = model.eigenvectors.float()  # U, for float32 rotations
        self._k32: dict[float, torch.Tensor] = {}  # K_p of the lams evaluate() saw, for maps(): (P, k, k) float32

    def _weights(self, lam_rels: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L,) absolute lams and (L, d) inv_b = 1 / (a s + lam), float64."""
        m = self.model
        lam = torch.tensor([m.lam(float(r)) for r in lam_rels], dtype=torch.float64, device=m.eigenvalues.device)
        return lam, 1.0 / (m.shrinkage * m.eigenvalues[None, :] + lam[:, None])

    def _rotated(self, grids: torch.Tensor, rows: slice) -> torch.Tensor:
        """z = U^T (y - mu_p) of the positions ``rows`` of (N, P, d) grids, by position: (c, N, d) float32."""
        m = self.model
        y = grids[:, rows].to(device=m.means.device, dtype=torch.float32) - m.means[rows].float()
        n, c, d = y.shape
        z = y.reshape(n * c, d) @ self._rotation
        return z.reshape(n, c, d).transpose(0, 1).contiguous()

    def _pieces(self, grids: torch.Tensor, positions: slice, lams: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """(positions, z of those positions (c, N, d) float32) for the ``positions`` of (N, P, d) grids: rotated at
        once, handed on in pieces small enough for the (c, d, L k) and (c, d, N L) products of ``lams`` lams."""
        m = self.model
        piece = max(1, _PIECE_NUMBERS // (m.dim * lams * max(m.rank, grids.shape[0])))
        z = self._rotated(grids, positions)
        for inner in _slices(z.shape[0], piece):
            part = z[inner]
            start = positions.start + inner.start
            yield slice(start, start + part.shape[0]), part

    def _factors(self, vectors: torch.Tensor, inv_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For S~ (c, d, k) float64 and inv_b (L, d): W = [B_l^-1 S~]_l (c, d, L k), K (c, L, k, k) and the
        Cholesky factors' log det part (c, L), all float64."""
        c, d, k = vectors.shape
        lams = inv_b.shape[0]
        weighted = (vectors[:, :, None, :] * inv_b.T[None, :, :, None]).reshape(c, d, lams * k)
        inner = (vectors.transpose(1, 2) @ weighted).reshape(c, k, lams, k).transpose(1, 2)  # S~^T B^-1 S~
        eye = torch.eye(k, dtype=torch.float64, device=vectors.device)
        chol = cholesky(eye + 0.5 * (inner + inner.transpose(-1, -2)))
        # det(B + S~ S~^T) = det B det(I + S~^T B^-1 S~) (the matrix determinant lemma)
        half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return weighted, cholesky_inverse(chol), half_logdet

    @staticmethod
    def _scores(z: torch.Tensor, vectors: torch.Tensor, kv: torch.Tensor, lam: torch.Tensor, inv_b: torch.Tensor):
        """(c, N, L) patch scores lam ||B^-1 (z - S~ K W^T z)||, formed directly (no expanded square to cancel) in
        float32, from z (c, N, d), S~ (c, d, k) float32, K W^T z (c, N, L, k) and the lams' (L,) lam and (L, d)
        inv_b."""
        c, n, lams, k = kv.shape
        correction = vectors @ kv.float().permute(0, 3, 1, 2).reshape(c, k, n * lams)  # (c, d, N L)
        residual = z.transpose(1, 2)[:, :, :, None] - correction.reshape(c, -1, n, lams)  # (c, d, N, L)
        residual.mul_(inv_b.float().T[:, None])
        return torch.linalg.vector_norm(residual, dim=1) * lam.float()

    def evaluate(self, grids: torch.Tensor, lam_grid: Sequence[float]) -> Evaluation:
        """Per image: mean over patches of z^T (S_p + lam I)^-1 z = z.inv_b z - v.K v (Woodbury, v = W^T z) plus
        log det, over 2 d; the products after the float32 rotation (and from a float32 S~) in float64, so nothing
        cancels in float32 (within 1e-5 of float64 throughout, tests/test_candidates.py). Scores in float32."""
        m = self.model
        n, p, d = grids.shape
        lam, inv_b = self._weights(lam_grid)
        lams = len(lam_grid)
        maps = np.empty((lams, n, p), dtype=np.float32)
        ks = torch.empty(p, lams, m.rank, m.rank, dtype=torch.float32)

        def task(positions: slice) -> torch.Tensor:
            total = torch.zeros(n, lams, dtype=torch.float64)
            for rows, z in self._pieces(grids, positions, lams):
                vectors32 = m.scaled_vectors[rows].float()
                vectors = m.scaled_vectors[rows].to(torch.float64)
                weighted, k, half_logdet = self._factors(vectors, inv_b)
                ks[rows] = k.float()
                z64 = z.double()
                v = (z64 @ weighted).reshape(z.shape[0], n, lams, m.rank)  # W^T z for every lam
                kv = torch.einsum("cnlk,clkj->cnlj", v, k)
                quad = z64.square() @ inv_b.T - (kv * v).sum(-1)  # (c, N, L)
                total += (quad + 2.0 * half_logdet[:, None, :]).sum(0)
                maps[:, :, rows] = self._scores(z, vectors32, kv, lam, inv_b).permute(2, 1, 0).cpu().numpy()
            return total

        totals = chunk_map(task, list(_task_chunks(grids)), grids)
        self._k32 = {float(r): ks[:, i] for i, r in enumerate(lam_grid)}
        logdet_b = -torch.log(inv_b).sum(1)  # (L,)
        nll = 0.5 * (torch.stack(totals).sum(0) / p + logdet_b[None, :]) / m.dim
        return Evaluation(nll.T.contiguous().numpy(), maps)

    def maps(self, grids: torch.Tensor, lams: Sequence[float]) -> np.ndarray:
        """Patch scores (L, N, P), in float32 (they only rank images); K_p as evaluate() had them where it saw the
        lam, else computed here."""
        m = self.model
        n, p, _ = grids.shape
        lam, inv_b = self._weights(lams)
        inv_b32 = inv_b.float()
        known = all(float(r) in self._k32 for r in lams)
        out = np.empty((len(lams), n, p), dtype=np.float32)

        def task(positions: slice) -> None:
            for rows, z in self._pieces(grids, positions, len(lams)):
                vectors32 = m.scaled_vectors[rows].float()
                c = vectors32.shape[0]
                if known:
                    k = torch.stack([self._k32[float(r)][rows] for r in lams], dim=1)
                    weighted = (vectors32[:, :, None, :] * inv_b32.T[None, :, :, None]).reshape(c, m.dim, -1)
                else:
                    weighted, k, _ = self._factors(m.scaled_vectors[rows].to(torch.float64), inv_b)
                    weighted, k = weighted.float(), k.float()
                v = (z @ weighted).reshape(c, n, len(lams), m.rank)
                kv = torch.einsum("cnlk,clkj->cnlj", v, k)
                out[:, :, rows] = self._scores(z, vectors32, kv, lam, inv_b).permute(2, 1, 0).cpu().numpy()

        chunk_map(task, list(_task_chunks(grids)), grids)
        return out
