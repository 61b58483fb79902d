"""How strong pseudo-defects must be to choose lam_rel: their image AUROC over lam beside the test set's.

On bench/experiments/quality.py's cached features of the elpv poly cells
(run `python bench/experiments/quality.py --features-only` first): the model is fitted on the first N - 40 training
cells (local CRD a 0.5, k 32, Frequent Directions sketch 64, and the global CRD); the last 40 are the clean held-out
cells, and pseudo-defect versions of them (crd_fast/synthetic/pseudo.py, the kinds in turn, other training cells
as cut-and-paste donors) are painted at each strength with two seeded draws and embedded by the same backbone.
Each row: one family and lam_rel; test image AUROC (max patch score) and the pseudo-defects' image AUROC against
the clean held-out cells, per strength (mean of the draws). The detector uses strength
crd_fast/selection/held_out.py PSEUDO_STRENGTH (docs/DESIGN.md "Label-free lam").

    python bench/experiments/pseudo_strength.py --backbone wrn50_random
    python bench/experiments/pseudo_strength.py --backbone vgg16_hed --strengths 1 2 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from quality_data import BACKBONES, _embed, _unit, elpv_images
from sklearn.metrics import roc_auc_score

from crd_fast.core.local import LocalCRDModel, LocalStatistics
from crd_fast.features.backbone import FeatureExtractor, input_normalisation
from crd_fast.features.preprocess import Preprocess
from crd_fast.metrics.scores import image_auroc
from crd_fast.synthetic.pseudo import make_pseudo_defects

LAMS = (1e-7, 1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="wrn50_random")
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12], help="pseudo-defect draws per strength")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "crd_quality_cache")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split = argparse.Namespace(seed=0, n_train=200, n_held_out=40, n_test_good=100, n_test_bad=100)
    cache = args.cache / f"{args.backbone}_elpv_s0_n200_100_100_px160-160_h40.npz"
    if not cache.is_file():
        raise SystemExit(
            f"no cached features at {cache}: run `python bench/experiments/quality.py --features-only` first"
        )
    train_imgs, _, _ = elpv_images(split)
    backbone, layers, weights = BACKBONES[args.backbone]
    mean, std = input_normalisation(weights, backbone)
    pre = Preprocess(160, 160, mean, std)
    extractor = FeatureExtractor(backbone, layers, weights, seed=0)
    unit = _unit(train_imgs, pre)
    held_n = split.n_held_out
    donors = [t.permute(1, 2, 0).numpy() for t in unit[:-held_n]]
    held = [t.permute(1, 2, 0).numpy() for t in unit[-held_n:]]
    pseudo = {}
    for s in args.strengths:
        for seed in args.seeds:
            images, _, _ = make_pseudo_defects(np.random.default_rng(seed), held, donors, strength=s)
            feats, _ = _embed(extractor, pre, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), 8)
            pseudo[(s, seed)] = feats.astype(np.float32)
    data = np.load(cache)
    train, test, labels = data["train"].astype(np.float32), data["test"].astype(np.float32), data["labels"]
    rest, clean = train[:-held_n], train[-held_n:]
    n, positions, dim = rest.shape
    stats = LocalStatistics(positions, dim, sketch=64)
    for i in range(0, n, 20):
        stats.update(torch.from_numpy(rest[i : i + 20]))
    cov = stats.within_covariance()
    values, vectors = stats.local_eigenpairs(32)
    model = LocalCRDModel.build(stats.means, cov, values, vectors, 0.5, pooled_eigh=torch.linalg.eigh(cov))
    flat = torch.from_numpy(rest.reshape(-1, dim)).double()
    mu, c = flat.mean(0), torch.cov(flat.T)
    s_glob, u = torch.linalg.eigh(c)
    s_glob = s_glob.clamp_min(0)
    mean_eig = float(s_glob.mean())

    def local_scores(z: torch.Tensor, lam: float) -> np.ndarray:
        return model.scores_rotated(z, model.factors(model.lam(lam))).numpy()

    def global_scores(z: torch.Tensor, lam: float) -> np.ndarray:
        return torch.linalg.vector_norm(z * (lam * mean_eig / (s_glob + lam * mean_eig)), dim=-1).numpy()

    rotations = {
        "local": lambda x: model.rotate(torch.from_numpy(x)),
        "global": lambda x: (torch.from_numpy(x).double() - mu) @ u,
    }

    print(f"{args.backbone}: fit on {n} cells, {held_n} clean held-out, draws {args.seeds}")
    print(f"{'family':6} {'lam_rel':>7} {'test':>6} | " + " ".join(f"x{s:g}".rjust(6) for s in args.strengths))
    chance = np.r_[np.zeros(held_n), np.ones(held_n)]
    for family, score in (("local", local_scores), ("global", global_scores)):
        rotate = rotations[family]  # once per set: every lam is then a reweighting
        z_clean, z_test = rotate(clean), rotate(test)
        z_pseudo = {key: rotate(x) for key, x in pseudo.items()}
        for lam in LAMS:
            clean_max = score(z_clean, lam).max(1)
            test_auc = image_auroc(labels, score(z_test, lam).max(1))
            cells = []
            for s in args.strengths:
                draws = [score(z_pseudo[(s, seed)], lam).max(1) for seed in args.seeds]
                aucs = [roc_auc_score(chance, np.r_[clean_max, d]) for d in draws]
                cells.append(f"{np.mean(aucs):6.3f}")
            print(f"{family:6} {lam:7.0e} {test_auc:6.3f} | " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
