"""The methods quality.py compares, all on the same (N, P, d) patch grids; image score = max patch score.

- CRD global: the paper's CRD (global mean and covariance), at a fixed lam_rel or the label-free choice;
- CRD local: per-position means, per-position covariance shrunk toward the pooled one at rank k (Woodbury,
  crd_fast/core/local.py), fixed or label-free lam, exact (Gram) or one-pass streaming (Frequent Directions sketch) fit;
- PaDiM's rule: per-position Gaussian, Mahalanobis distance, covariance X^T X / (N - 1) + 0.01 I, evaluated
  exactly through the N x N Gram matrix (the d x d inverse is never formed; checked against it);
- 1-NN over the whole bank (PatchCore's rule, no reweighting): exact image scores by bound pruning (below),
  over a 10% random bank, and over PatchCore's 10% greedy coreset (random projection to 128 dims).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from crd_fast.core.lam_selection import DEFAULT_LAM_GRID, SpectralForm
from crd_fast.core.local import LocalCRDModel, LocalStatistics, local_eigenpairs_from_patches, within_covariance
from crd_fast.core.stats import PatchStatistics
from crd_fast.scoring.candidates import GlobalCandidate, LocalCandidate
from crd_fast.selection.choice import choose
from crd_fast.selection.held_out import HeldOutSet
from crd_fast.selection.record import SelectionRecord

CHUNK = 16  # images per scoring chunk (bounds the float64 working set)


def _chunks(x: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    return np.concatenate([fn(torch.from_numpy(x[i : i + CHUNK]).double()).numpy() for i in range(0, len(x), CHUNK)])


# -- CRD global ---------------------------------------------------------------------------------
def global_form(train: np.ndarray) -> SpectralForm:
    stats = PatchStatistics(train.shape[2])
    for i in range(0, len(train), CHUNK):
        stats.update(torch.from_numpy(train[i : i + CHUNK]).reshape(-1, train.shape[2]))
    return SpectralForm.from_covariance(stats.covariance(), stats.mean)


def global_maps(form: SpectralForm, x: np.ndarray, lam_rels) -> dict[float, np.ndarray]:
    """Patch maps (M, P) for every lam_rel, from one rotation."""
    lam_rels = tuple(dict.fromkeys(lam_rels))  # a repeated value would be scored (and appended) twice
    out = {lam: [] for lam in lam_rels}
    for i in range(0, len(x), CHUNK):
        z = form.rotate(torch.from_numpy(x[i : i + CHUNK]))
        for lam in lam_rels:
            out[lam].append(form.scores(z, lam).numpy())
    return {lam: np.concatenate(v) for lam, v in out.items()}


# -- CRD local ----------------------------------------------------------------------------------
def local_model(
    train: np.ndarray, shrinkage: float, rank: int, sketch: int | None = None, like: LocalCRDModel | None = None
) -> LocalCRDModel:
    """Exact fit (Gram, all patches in memory) when ``sketch`` is None, else the one-pass streaming fit with a
    Frequent Directions sketch of ``sketch`` directions per position (LocalStatistics, CHUNK images at a time).

    ``like``: a model fitted on the same images, whose pooled eigendecomposition is reused (the streaming fit's
    pooled covariance is exact, so it is the same C)."""
    eig = None if like is None else (like.eigenvalues, like.eigenvectors)
    n, p, d = train.shape
    if sketch is None:
        pooled = PatchStatistics(d)
        for i in range(0, n, CHUNK):
            pooled.update(torch.from_numpy(train[i : i + CHUNK]).reshape(-1, d))
        means, vals, vecs = local_eigenpairs_from_patches(torch.from_numpy(train), rank)
        cov = within_covariance(pooled, means)
    else:
        stats = LocalStatistics(p, d, sketch)
        for i in range(0, n, CHUNK):
            stats.update(torch.from_numpy(train[i : i + CHUNK]))
        means, cov = stats.means, stats.within_covariance()
        vals, vecs = stats.local_eigenpairs(rank)
    return LocalCRDModel.build(means, cov, vals, vecs, shrinkage, pooled_eigh=eig)


def local_maps(model: LocalCRDModel, x: np.ndarray, lam_rels) -> dict[float, np.ndarray]:
    lam_rels = tuple(dict.fromkeys(lam_rels))
    factors = {lam: model.factors(model.lam(lam)) for lam in lam_rels}
    out = {lam: [] for lam in lam_rels}
    for i in range(0, len(x), CHUNK):
        z = model.rotate(torch.from_numpy(x[i : i + CHUNK]))
        for lam in lam_rels:
            out[lam].append(model.scores_rotated(z, factors[lam]).numpy())
    return {lam: np.concatenate(v) for lam, v in out.items()}


# -- label-free choice: the detector's rule on cached features -----------------------------------------
def label_free_choice(fit: np.ndarray, clean: np.ndarray, pseudo: np.ndarray, pseudo_masks: np.ndarray, local_fit):
    """``crd_fast.selection.choice.choose`` (what CRDDetector(lam_rel="auto", spatial="auto") runs) on cached
    features: the global statistics and ``local_fit`` (a LocalCRDModel) of ``fit``, judged on the clean held-out
    grids and their pseudo-defect grids. Returns (spatial, lam_rel, family records, the reason in words).

    The cache holds the x4 pseudo-defects only (quality_data.py): the detector pools them with the defect-like
    kinds at x2 (crd_fast/selection/held_out.py ``PSEUDO_DESIGNS``), so this is its rule with one design; the
    detector's own choice is the end-to-end row (quality_e2e.py)."""
    stats = PatchStatistics(fit.shape[2])
    for i in range(0, len(fit), CHUNK):
        stats.update(torch.from_numpy(fit[i : i + CHUNK]).reshape(-1, fit.shape[2]))
    held = HeldOutSet(torch.from_numpy(clean), torch.from_numpy(pseudo), np.asarray(pseudo_masks, bool), [])
    candidates = {"global": GlobalCandidate(stats, True), "local": LocalCandidate(local_fit)}
    decision = choose(held, tuple(DEFAULT_LAM_GRID), candidates)
    record = SelectionRecord(
        {}, decision.spatial, decision.lam_rel, len(fit) + len(clean), len(clean), list(DEFAULT_LAM_GRID),
        decision.families, decision.paired_likelihood, decision.evidence,
    )  # fmt: skip
    families = {name: curves.to_dict() for name, curves in decision.families.items()}
    return decision.spatial, decision.lam_rel, families, record.reason()


# -- PaDiM's rule -------------------------------------------------------------------------------
def padim_maps(train: np.ndarray, x: np.ndarray, eps: float = 0.01) -> np.ndarray:
    """Mahalanobis distances (M, P) under N(mu_p, X_p^T X_p / (N - 1) + eps I), exactly via Woodbury:
    d^2 = (||r||^2 - (X r)^T (eps (N - 1) I + X X^T)^-1 (X r)) / eps."""
    xt = torch.from_numpy(train).double().permute(1, 0, 2)  # (P, N, d)
    n = xt.shape[1]
    mu = xt.mean(dim=1, keepdim=True)
    xc = xt - mu
    inner = eps * (n - 1) * torch.eye(n, dtype=torch.float64) + xc @ xc.transpose(1, 2)
    chol = torch.linalg.cholesky(inner)
    out = []
    for i in range(0, len(x), CHUNK):
        r = torch.from_numpy(x[i : i + CHUNK]).double().permute(1, 0, 2) - mu  # (P, B, d)
        xr = xc @ r.transpose(1, 2)  # (P, N, B)
        sol = torch.cholesky_solve(xr, chol)
        d2 = ((r * r).sum(-1) - (xr * sol).sum(1)) / eps
        out.append(d2.clamp_min(0).sqrt().T.numpy())
    return np.concatenate(out)


def padim_direct_check(train: np.ndarray, x: np.ndarray, positions=(0, 7), eps: float = 0.01) -> float:
    """Largest relative difference between :func:`padim_maps` and a dense d x d inverse at a few positions."""
    fast = padim_maps(train, x[:4], eps)
    worst = 0.0
    for p in positions:
        xp = torch.from_numpy(train[:, p]).double()
        cov = torch.cov(xp.T) + eps * torch.eye(xp.shape[1], dtype=torch.float64)
        r = torch.from_numpy(x[:4, p]).double() - xp.mean(0)
        direct = torch.sqrt((r * torch.linalg.solve(cov, r.T).T).sum(1)).numpy()
        worst = max(worst, float(np.max(np.abs(direct - fast[:, p]) / direct)))
    return worst


# -- nearest neighbours -------------------------------------------------------------------------
def _index(bank: np.ndarray):
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    return index


def nn_maps(bank: np.ndarray, x: np.ndarray) -> np.ndarray:
    """1-NN distance (M, P) of every patch to ``bank`` (K, d)."""
    index = _index(bank)
    m, p, d = x.shape
    dist, _ = index.search(np.ascontiguousarray(x.reshape(-1, d), dtype=np.float32), 1)
    return np.sqrt(np.maximum(dist[:, 0], 0)).reshape(m, p)


def nn_exact_image_scores(bank: np.ndarray, x: np.ndarray, upper: np.ndarray, step: int = 8) -> tuple[np.ndarray, int]:
    """Exact max_p min_b ||x_p - b|| per image, given upper bounds ``upper`` (M, P) of each patch's 1-NN distance
    (from any sub-bank). Patches are searched in decreasing order of their bound until no unsearched bound
    exceeds the best exact distance found. Returns (scores (M,), number of patches searched)."""
    index = _index(bank)
    m, p, d = x.shape
    order = np.argsort(-upper, axis=1)
    best = np.full(m, -np.inf)
    pos = np.zeros(m, dtype=int)
    searched = 0
    while True:
        todo = [i for i in range(m) if pos[i] < p and upper[i, order[i, pos[i]]] > best[i]]
        if not todo:
            break
        rows = [(i, order[i, pos[i] : pos[i] + step]) for i in todo]
        queries = np.concatenate([x[i, idx] for i, idx in rows]).astype(np.float32)
        dist, _ = index.search(queries, 1)
        dist = np.sqrt(np.maximum(dist[:, 0], 0))
        at = 0
        for i, idx in rows:
            best[i] = max(best[i], dist[at : at + len(idx)].max())
            at += len(idx)
            pos[i] += len(idx)
        searched += len(queries)
    return best, searched


def coreset(bank: np.ndarray, fraction: float, seed: int, proj_dim: int = 128) -> np.ndarray:
    """PatchCore's greedy k-center coreset (on a random projection to ``proj_dim`` dims): indices into bank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(bank).float()
    proj = x @ (torch.randn(x.shape[1], proj_dim, generator=g) / proj_dim**0.5)
    k = max(1, int(len(bank) * fraction))
    chosen = [int(torch.randint(len(bank), (1,), generator=g))]
    mind = torch.cdist(proj, proj[chosen[0]][None]).squeeze(1)
    for _ in range(k - 1):
        nxt = int(torch.argmax(mind))
        chosen.append(nxt)
        mind = torch.minimum(mind, torch.linalg.vector_norm(proj - proj[nxt], dim=1))
    return np.array(chosen)


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t
