"""What a local head file's storage precision and per-position rank cost against the exact float64 local model.

Fits a LocalCRDScorer on generated patch grids with per-position structure (a fixed pattern per position, a
position-dependent low-rank part with decaying strengths, isotropic noise), then reports, per variant, the
largest and mean relative error of patch and image scores (``measure_local_error``, float32 compute as
deployed) and the bytes the head file stores:

    python bench/experiments/local_head_error.py --positions 49 --dim 256 --rank 32

The rank rows are a different model (the top-r per-position directions only), not a rounding: their error is
what dropping directions does to these data, which have ``--true-rank`` real directions per position.
"""

from __future__ import annotations

import argparse

import torch

from crd_fast.deploy.head_errors import measure_local_error
from crd_fast.scorers.local import LocalCRDScorer


def grids(n: int, base: torch.Tensor, basis: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    coef = torch.randn(n, basis.shape[0], basis.shape[2], generator=g, dtype=torch.float64)
    noise = torch.randn(n, *base.shape[1:], generator=g, dtype=torch.float64)
    return base + torch.einsum("pdk,npk->npd", basis, coef) + 0.3 * noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=49)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32, help="k of the fitted local model")
    parser.add_argument("--true-rank", type=int, default=24, help="directions per position in the generated data")
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    p, d, q = args.positions, args.dim, args.true_rank
    base = 3 * torch.randn(1, p, d, generator=g, dtype=torch.float64)
    strengths = torch.linspace(2, 0.2, q, dtype=torch.float64)
    basis = torch.randn(p, d, q, generator=g, dtype=torch.float64) / q**0.5 * strengths
    train, test = grids(args.train, base, basis, g), grids(args.test, base, basis, g)
    print("lam_rel  storage  rank    patch max  patch mean  image max  stored bytes")
    for lam_rel in (1e-2, 1e-4):
        scorer = LocalCRDScorer(lam_rel=lam_rel, shrinkage=0.5, rank=args.rank, sketch=max(64, args.train + 1))
        scorer.fit(train)
        variants = [("fp64", None), ("fp32", None), ("fp16", None)]
        variants += [(prec, r) for r in (args.rank * 3 // 4, args.rank // 2) for prec in ("fp64", "fp16")]
        for precision, rank in variants:
            e = measure_local_error(scorer, test, precision, rank)
            print(
                f"{lam_rel:<8g} {precision:<8} {e['rank']:>2}/{e['model_rank']:<3} {e['patch_max_rel']:>10.2e} "
                f"{e['patch_mean_rel']:>11.2e} {e['image_max_rel']:>10.2e} {e['stored_bytes']:>13}"
            )


if __name__ == "__main__":
    main()
