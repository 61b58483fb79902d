"""Local CRD on cached features: image AUROC over shrinkage a, rank k and lam_rel, exact and one-pass fits.

    python bench/experiments/quality.py --features-only      # writes the feature caches (once; see its --cache)
    python bench/experiments/local_sweep.py CACHE/wrn50_random_elpv_s0_n200_100_100_px160-160_h40.npz \
        --shrinkage 0.5 0.25 --rank 32 64

For each (a, k) the per-position eigenpairs come from the exact Gram fit (``local_eigenpairs_from_patches``)
or, with ``--sketch ELL``, from the one-pass Frequent Directions statistics (``LocalStatistics``); every lam_rel
rescales one rotation of the test patches (docs/DESIGN.md "Position-aware CRD"). Image score = largest patch score.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from crd_fast.core.local import LocalCRDModel, LocalStatistics, local_eigenpairs_from_patches
from crd_fast.metrics.scores import image_auroc

CHUNK = 20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache", help="a feature cache written by bench/experiments/quality.py (train, test, labels)")
    p.add_argument("--shrinkage", type=float, nargs="+", default=[0.5])
    p.add_argument("--rank", type=int, nargs="+", default=[32])
    p.add_argument("--lam", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument("--sketch", type=int, default=None, help="one-pass FD fit with this ell (default: exact Gram fit)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = np.load(args.cache)
    train, test, labels = data["train"].astype(np.float32), data["test"].astype(np.float32), data["labels"]
    n, positions, dim = train.shape
    kmax = max(args.rank)
    stats = LocalStatistics(positions, dim, sketch=args.sketch or max(kmax + 1, 2))
    for i in range(0, n, CHUNK):
        stats.update(torch.from_numpy(train[i : i + CHUNK]))
    cov = stats.within_covariance()
    if args.sketch is None:
        means, values, vectors = local_eigenpairs_from_patches(torch.from_numpy(train), kmax)
    else:
        means = stats.means
        values, vectors = stats.local_eigenpairs(kmax)
    eig = torch.linalg.eigh(cov)
    for a in args.shrinkage:
        for k in args.rank:
            model = LocalCRDModel.build(means, cov, values[:, :k], vectors[:, :, :k], a, pooled_eigh=eig)
            factors = {lam: model.factors(model.lam(lam)) for lam in args.lam}
            maps = {lam: [] for lam in args.lam}
            for j in range(0, len(test), CHUNK):
                z = model.rotate(torch.from_numpy(test[j : j + CHUNK]))
                for lam in args.lam:
                    maps[lam].append(model.scores_rotated(z, factors[lam]).numpy())
            aucs = " ".join(f"{lam:g}: {image_auroc(labels, np.concatenate(maps[lam]).max(1)):.4f}" for lam in args.lam)
            print(f"a {a:g}  k {k:3d}  {aucs}", flush=True)


if __name__ == "__main__":
    main()
