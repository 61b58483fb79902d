"""What bench/experiments/lam_criteria.py measures once per (backbone, set), cached: every lam_rel of the grid
for both spatial families, on the test images (for the oracle and the table) and on held-out folds of the
training images (for the label-free criteria).

Full models (all N training images): the global CRD and the local CRD (a 0.5, k 32, exact per-position
eigenpairs from the N x N Gram matrices, bench/experiments/quality_methods.py's exact fit), their test patch maps
at every lam_rel of the grid, and PaDiM's rule (per-position Gaussian, eps 0.01,
bench/experiments/quality_methods.py) on the same features.

Held-out fold f (lam_criteria_sets.fold_positions: fold 0 is the detector's own hold-out): both families fitted on
the rest, their held-out negative log-likelihood per clean image and lam (crd_fast/detector/candidates.py, float64),
the clean held-out patch maps, and the image scores (largest patch score) of every pseudo-defect design's images.
Scores that only rank images are float32, as in the detector (its pseudo-defect maps of the local family).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from lam_criteria_sets import quality_methods as qm  # bench/experiments/quality_methods.py, wherever it lives

from crd_fast.core.local import LocalCRDModel, local_eigenpairs_from_patches, within_covariance
from crd_fast.core.stats import PatchStatistics
from crd_fast.scoring.candidates import GlobalCandidate, LocalCandidate

CHUNK = 16  # images per scoring chunk
SHRINKAGE, RANK = 0.5, 32  # the detector's local defaults (crd_fast.choices)


def statistics(x: np.ndarray) -> PatchStatistics:
    """Float64 statistics of every patch of (n, P, d) grids."""
    stats = PatchStatistics(x.shape[2])
    for i in range(0, len(x), CHUNK):
        stats.update(torch.from_numpy(np.asarray(x[i : i + CHUNK], dtype=np.float32)).reshape(-1, x.shape[2]))
    return stats


def downdate(total: PatchStatistics, part: PatchStatistics) -> PatchStatistics:
    """The statistics of the patches of ``total`` not in ``part`` (Chan's merge solved for one side, exact)."""
    n = total.count - part.count
    mean = (total.mean * total.count - part.mean * part.count) / n
    delta = part.mean - mean
    scatter = total.scatter - part.scatter - torch.outer(delta, delta) * (n * part.count / total.count)
    return PatchStatistics.from_tensors(n, mean, 0.5 * (scatter + scatter.T))


def local_fit(x: np.ndarray, pooled: PatchStatistics) -> LocalCRDModel:
    """The local model of (n, P, d) grids whose pooled statistics are ``pooled`` (exact per-position top-k)."""
    means, values, vectors = local_eigenpairs_from_patches(torch.from_numpy(np.asarray(x, dtype=np.float32)), RANK)
    return LocalCRDModel.build(means, within_covariance(pooled, means), values, vectors, SHRINKAGE)


class GlobalMaps:
    """Float32 patch maps of the global CRD at every lam_rel of a grid: one rotation and one (d, L) product."""

    def __init__(self, stats: PatchStatistics, grid) -> None:
        self.cand = GlobalCandidate(stats, True)
        s = self.cand.eigenvalues
        lams = torch.tensor(grid, dtype=torch.float64) * self.cand.form.mean_eigenvalue
        self.weights = ((lams / (s[:, None] + lams)) ** 2).float()  # (d, L)
        self.u = self.cand.form.eigenvectors.float()
        self.mu = self.cand.form.mean.float()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), CHUNK):
            z = (torch.from_numpy(np.asarray(x[i : i + CHUNK], dtype=np.float32)) - self.mu) @ self.u
            out.append((z.square_() @ self.weights).clamp_min_(0).sqrt_().numpy())
        return np.concatenate(out)  # (n, P, L)


class LocalMaps:
    """Float32 patch maps of a local model at every lam_rel of a grid (crd_fast/detector/candidates.py)."""

    def __init__(self, cand: LocalCandidate, grid) -> None:
        self.cand, self.grid = cand, tuple(grid)  # the candidate keeps each lam's Woodbury factors

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), CHUNK):
            rot = self.cand.rotate(torch.from_numpy(np.asarray(x[i : i + CHUNK], dtype=np.float32)), torch.float32)
            out.append(np.stack([self.cand.maps(rot, lam) for lam in self.grid], axis=-1))
        return np.concatenate(out).astype(np.float32)  # (n, P, L)


def likelihoods(cand, clean: np.ndarray, grid) -> np.ndarray:
    """Held-out negative log-likelihood per clean image and lam_rel (H, L), float64 as in the detector."""
    rot = cand.rotate(torch.from_numpy(np.asarray(clean, dtype=np.float32)))
    return np.stack([cand.likelihood(rot, lam) for lam in grid], axis=1)


def measure_full(train: np.ndarray, test: np.ndarray, grid, path: Path) -> dict:
    """Test patch maps of both families at every lam_rel and PaDiM's image scores; cached in ``path``."""
    if path.is_file():
        return dict(np.load(path, allow_pickle=False))
    t0 = time.perf_counter()
    train = np.asarray(train, dtype=np.float32)
    test = np.asarray(test, dtype=np.float32)
    stats = statistics(train)
    out = {"test_maps_global": GlobalMaps(stats, grid)(test)}
    out["test_maps_local"] = LocalMaps(LocalCandidate(local_fit(train, stats)), grid)(test)
    out["padim"] = qm.padim_maps(train, test).max(axis=1)
    out["seconds"] = np.array(time.perf_counter() - t0)
    _save(path, out)
    return out


def measure_fold(
    train: np.ndarray, total: PatchStatistics, positions: np.ndarray, pseudo: dict, grid, path: Path
) -> dict:
    """One held-out fold: likelihoods, clean maps and pseudo-defect image scores of both families fitted on the
    rest. ``pseudo``: design -> PseudoFold of the fold's held-out images. Cached in ``path``."""
    if path.is_file():
        return dict(np.load(path, allow_pickle=False))
    t0 = time.perf_counter()
    held = np.zeros(len(train), bool)
    held[positions] = True
    clean = np.asarray(train[positions], dtype=np.float32)
    rest = np.asarray(train[~held], dtype=np.float32)
    rest_stats = downdate(total, statistics(clean))
    out: dict = {"positions": positions}
    families = {
        "global": lambda: (GlobalCandidate(rest_stats, True), GlobalMaps(rest_stats, grid)),
        "local": lambda: _local_pair(rest, rest_stats, grid),
    }
    for family, build in families.items():
        cand, maps = build()
        out[f"nll_{family}"] = likelihoods(cand, clean, grid)
        out[f"clean_{family}"] = maps(clean)
        for design, fold in pseudo.items():
            out[f"pseudo_{design}_{family}"] = maps(fold.features).max(axis=1)
            out[f"kinds_{design}"] = fold.kinds
        del cand, maps
    out["seconds"] = np.array(time.perf_counter() - t0)
    _save(path, out)
    return out


def _local_pair(rest: np.ndarray, stats: PatchStatistics, grid):
    cand = LocalCandidate(local_fit(rest, stats))
    return cand, LocalMaps(cand, grid)


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)
