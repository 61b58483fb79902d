"""What the detector's label-free choice (lam_rel="auto", spatial="auto") costs, as a share of the fit.

Fits CRDDetector on generated defect-free images (crd_fast.synthetic) with a seeded random backbone, once with
explicit options (lam_rel=0.01, spatial="global": no choice) and once with the options asked, and prints the
selection's own seconds (pseudo-defects, their forward passes, the candidates, the merge), the whole fit's seconds
and the choice. Example:

    python bench/experiments/selection_cost.py --backbone resnet18 --images 100 --category cap
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crd_fast import CRDDetector
from crd_fast.selection.record import selection_table
from crd_fast.synthetic import render_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--category", default="cap")
    p.add_argument("--size", type=int, default=256, help="generated image side (resize 256, crop 224 as default)")
    p.add_argument("--spatial", default="auto", choices=("global", "local", "auto"))
    p.add_argument("--lam-rel", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = [render_sample(args.category, args.size, 0, None, i, "train")[0] for i in range(args.images)]
    base = dict(backbone=args.backbone, weights="random", batch_size=8, device=args.device)
    from crd_fast.metrics import scores as metrics  # noqa: F401  (its one-off import is not the selection's cost)

    lam = args.lam_rel if args.lam_rel == "auto" else float(args.lam_rel)
    t0 = time.perf_counter()
    CRDDetector(**base, lam_rel=0.01, spatial="global").fit(images, progress=False)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    det = CRDDetector(**base, lam_rel=lam, spatial=args.spatial).fit(images, progress=False)
    auto = time.perf_counter() - t0
    record = det.selection
    rec = record.to_dict() if record is not None else {}
    out = {
        "backbone": args.backbone,
        "images": args.images,
        "category": args.category,
        "asked": {"lam_rel": args.lam_rel, "spatial": args.spatial},
        "d": det.dim,
        "patch_grid": list(det.patch_grid),
        "fit_seconds_explicit_global": round(plain, 2),
        "fit_seconds_asked": round(auto, 2),
        "selection_seconds": rec.get("seconds"),
        "selection_share_of_fit": round(rec.get("seconds", 0.0) / auto, 4),
        "pseudo_defect_seconds": rec.get("pseudo_defect_seconds"),
        "local_model_seconds": rec.get("local_model_seconds"),
        "family_seconds": {f: r.get("seconds") for f, r in rec.get("families", {}).items()},
        "choice": rec.get("choice"),
        "held_out": rec.get("held_out"),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out, indent=1))
    if record is not None:
        print("\n".join(selection_table(record)))


if __name__ == "__main__":
    main()
