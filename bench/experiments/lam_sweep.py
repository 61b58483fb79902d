"""How the CRD ridge strength lam_rel (and centring) changes detection quality: the measurement behind the default.

Fits a detector once per category of the generated demo data set, embeds the test images once, then
rescores the same embeddings for every (lam_rel, center) pair: only the d x d projection changes, so the
sweep costs one backbone pass. Prints a table of image AUROC, pixel AUROC and AUPRO per setting, and
writes it as JSON.

    python bench/experiments/lam_sweep.py --backbone resnet18 --out bench/experiments/lam_sweep_resnet18.json

The backbone is randomly initialised here (no weights can be downloaded on the development machines),
so the figures say how the settings rank on these data, not what accuracy real ImageNet features reach.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crd_fast import CRDDetector
from crd_fast.core.embedding import patch_matrix
from crd_fast.data import MVTecAD
from crd_fast.metrics import scores as metrics
from crd_fast.synthetic import generate_dataset
from crd_fast.synthetic.dataset import CATEGORIES

LAM_RELS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 10.0)


def sweep_category(root: Path, category: str, args: argparse.Namespace) -> list[dict]:
    det = CRDDetector(
        backbone=args.backbone,
        weights="random",
        seed=args.seed,
        resize=args.resize,
        crop=args.crop,
        embedding=args.embedding,
        batch_size=8,
        spatial="global",  # one d x d model whose lam_rel and centring are rescored below
        lam_rel=0.01,
    )
    det.fit(MVTecAD(root, category, "train"), progress=False)
    test = MVTecAD(root, category, "test")
    labels, masks = test.labels, test.masks(det.preprocess)
    emb = torch.cat([det.embed(x) for _, x in det.iter_batches(test)])
    b, d, h, w = emb.shape
    patches = patch_matrix(emb).double()
    rows = []
    for center in (True, False):
        for lam_rel in LAM_RELS:
            scorer = det.model.scorer
            scorer.lam_rel, scorer.center = lam_rel, center
            patch_maps = scorer.score(patches).reshape(b, h, w).float()
            maps = det.mapper(patch_maps).numpy()
            image_scores = patch_maps.flatten(1).max(dim=1).values.numpy()
            rows.append(
                {
                    "category": category,
                    "lam_rel": lam_rel,
                    "center": center,
                    "image_auroc": metrics.image_auroc(labels, image_scores),
                    "pixel_auroc": metrics.pixel_auroc(masks, maps),
                    "aupro": metrics.aupro(masks, maps),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--embedding", default="concat")
    parser.add_argument("--categories", nargs="+", default=sorted(CATEGORIES))
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, args.categories, n_train=args.n_train, n_test_good=12, n_test_defect=15, seed=args.seed)
        rows = [r for c in args.categories for r in sweep_category(Path(tmp), c, args)]
    print(
        f"lam_rel sweep: backbone {args.backbone} (RANDOM weights, seed {args.seed}), embedding {args.embedding}, "
        f"categories {', '.join(args.categories)}, {time.perf_counter() - t0:.0f} s"
    )
    print(
        f"{'center':>6} {'lam_rel':>8} | {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7}   (mean over categories)"
    )
    for center in (True, False):
        for lam_rel in LAM_RELS:
            sel = [r for r in rows if r["center"] == center and r["lam_rel"] == lam_rel]
            mean = {k: float(np.mean([r[k] for r in sel])) for k in ("image_auroc", "pixel_auroc", "aupro")}
            print(
                f"{str(center):>6} {lam_rel:>8g} | {mean['image_auroc']:>11.4f} "
                f"{mean['pixel_auroc']:>11.4f} {mean['aupro']:>7.4f}"
            )
    if args.out is not None:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
