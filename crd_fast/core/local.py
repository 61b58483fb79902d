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

Fitting with memory independent of the number of images (:class:`LocalStatistics`), two streaming passes:

1. per-position means (P x d) and the pooled statistics (d x d); C follows exactly from the identity
   total scatter = within-position scatter + between-position scatter;
2. per-position scatter of the centred patches in a reduced orthonormal basis Q (d x r, by default the
   top-r eigenvectors of C): P x r x r numbers whatever N is. C_p's top-k eigenpairs are then those of
   Q Q^T C_p Q Q^T, i.e. exact within span(Q) (r = d is exact).

When the training patches fit in memory, :func:`local_eigenpairs_from_patches` gets the exact top-k from
the N x N Gram matrix at each position instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .stats import PatchStatistics


def _check_grid(x: torch.Tensor, name: str, positions: Optional[int] = None, dim: Optional[int] = None) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must be (images, positions, d), got shape {tuple(x.shape)}")
    if positions is not None and x.shape[1] != positions:
        raise ValueError(f"{name} has {x.shape[1]} positions, the model has {positions}")
    if dim is not None and x.shape[2] != dim:
        raise ValueError(f"{name} has d={x.shape[2]}, the model has d={dim}")


def _top_eigenpairs(sym: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of symmetric matrices (..., m, m): values (..., k) descending, vectors (..., m, k)."""
    evals, evecs = torch.linalg.eigh(0.5 * (sym + sym.transpose(-1, -2)))
    k = min(k, sym.shape[-1])
    vals = evals[..., -k:].flip(-1).clamp_min(0.0)  # rounding can leave tiny negative eigenvalues
    vecs = evecs[..., -k:].flip(-1)
    return vals, vecs


class LocalStatistics:
    """Streaming statistics for the local model: pass 1 (means, pooled covariance), pass 2 (per-position scatter).

    Patches come as (B, P, d) grids, one row of P positions per image. Memory: P*d + d^2 in pass 1,
    P*r^2 in pass 2 (r = basis rank), independent of the number of images.
    """

    def __init__(self, positions: int, dim: int, device: Optional[torch.device] = None) -> None:
        if positions <= 0 or dim <= 0:
            raise ValueError(f"positions and dim must be positive, got {positions} and {dim}")
        self.positions, self.dim = int(positions), int(dim)
        self.images = 0
        self.means = torch.zeros(positions, dim, dtype=torch.float64, device=device)
        self.pooled = PatchStatistics(dim, device=device)
        self.basis: Optional[torch.Tensor] = None
        self.local_scatter: Optional[torch.Tensor] = None
        self.second_pass_images = 0

    # -- pass 1 ---------------------------------------------------------------------------------
    def update(self, grid: torch.Tensor) -> "LocalStatistics":
        """Pass 1: add a (B, P, d) batch of patch grids."""
        _check_grid(grid, "grid", self.positions, self.dim)
        if self.local_scatter is not None:
            raise RuntimeError("pass 2 has begun: pass-1 statistics are frozen (start a new LocalStatistics)")
        g = grid.to(device=self.means.device, dtype=torch.float64)
        b = g.shape[0]
        if b == 0:
            return self
        n = self.images + b
        self.means += (g.mean(dim=0) - self.means) * (b / n)
        self.images = n
        self.pooled.update(g.reshape(-1, self.dim))
        return self

    def within_covariance(self) -> torch.Tensor:
        """C = (1/(N P)) sum_p sum_i (x_ip - mu_p)(x_ip - mu_p)^T = mean_p C_p (exact identity, no second pass)."""
        if self.images < 1:
            raise ValueError("no patch grids have been added")
        between = self.means - self.pooled.mean
        within = self.pooled.scatter - self.images * (between.T @ between)
        cov = within / self.pooled.count
        return 0.5 * (cov + cov.T)

    # -- pass 2 ---------------------------------------------------------------------------------
    def begin_second_pass(self, basis_rank: Optional[int] = None, basis: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fix the reduced basis Q (d x r) for pass 2: ``basis`` if given, else the top ``basis_rank``
        eigenvectors of C (all d when None). Returns Q."""
        if basis is None:
            cov = self.within_covariance()
            r = self.dim if basis_rank is None else int(basis_rank)
            if not 1 <= r <= self.dim:
                raise ValueError(f"basis_rank must be in [1, {self.dim}], got {basis_rank}")
            _, basis = _top_eigenpairs(cov, r)
        else:
            if basis.ndim != 2 or basis.shape[0] != self.dim:
                raise ValueError(f"basis must be (d={self.dim}, r), got shape {tuple(basis.shape)}")
            basis = basis.to(device=self.means.device, dtype=torch.float64)
        r = basis.shape[1]
        self.basis = basis
        self.local_scatter = torch.zeros(self.positions, r, r, dtype=torch.float64, device=self.means.device)
        self.second_pass_images = 0
        return basis

    def update_local(self, grid: torch.Tensor) -> "LocalStatistics":
        """Pass 2: add a (B, P, d) batch (the same images as pass 1) to the per-position scatter in the basis."""
        if self.local_scatter is None or self.basis is None:
            raise RuntimeError("call begin_second_pass() before update_local()")
        _check_grid(grid, "grid", self.positions, self.dim)
        g = grid.to(device=self.means.device, dtype=torch.float64) - self.means
        z = torch.einsum("bpd,dr->pbr", g, self.basis)  # (P, B, r)
        self.local_scatter += z.transpose(1, 2) @ z
        self.second_pass_images += g.shape[0]
        return self

    def local_eigenpairs(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``rank`` eigenpairs of each C_p within span(Q): values (P, k), vectors (P, d, k)."""
        if self.local_scatter is None or self.basis is None:
            raise RuntimeError("pass 2 has not been run")
        if self.second_pass_images != self.images:
            raise RuntimeError(
                f"pass 2 saw {self.second_pass_images} images, pass 1 saw {self.images}: feed the same images"
            )
        vals, vecs = _top_eigenpairs(self.local_scatter / self.images, rank)
        return vals, torch.einsum("dr,prk->pdk", self.basis, vecs)


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
        evals, evecs = torch.linalg.eigh(pooled_cov.to(torch.float64)) if pooled_eigh is None else pooled_eigh
        evals, evecs = evals.to(torch.float64).clamp_min(0.0), evecs.to(torch.float64)
        scale = torch.sqrt((1.0 - shrinkage) * local_values.to(torch.float64).clamp_min(0.0))
        rotated = torch.einsum("de,pdk->pek", evecs, local_vectors.to(torch.float64)) * scale[:, None, :]
        return cls(means.to(torch.float64), evals, evecs, rotated.contiguous(), float(shrinkage))

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
        k = torch.linalg.inv(eye + 0.5 * (inner + inner.transpose(1, 2)))
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
