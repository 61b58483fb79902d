"""Entry point of the ``crd-fast`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    """Fit a CRD scorer on generated normal patches and score held-out normal and anomalous ones."""
    import torch
    from sklearn.metrics import roc_auc_score

    from .. import CRDScorer, NNScorer

    gen = torch.Generator().manual_seed(args.seed)
    d, rank_true = args.dim, max(2, args.dim // 8)
    basis = torch.randn(d, rank_true, generator=gen)
    def normal(n: int) -> torch.Tensor:  # normal patches live near a low-dimensional subspace
        return torch.randn(n, rank_true, generator=gen) @ basis.T + 0.05 * torch.randn(n, d, generator=gen)
    train, test_ok = normal(args.n_train), normal(args.n_test)
    test_bad = normal(args.n_test) + 0.5 * torch.randn(args.n_test, d, generator=gen)  # off-subspace noise
    labels = [0] * args.n_test + [1] * args.n_test
    test = torch.cat([test_ok, test_bad])
    print(f"crd-fast demo: {args.n_train} generated normal patches of d={d}; {2 * args.n_test} test patches")
    for name, scorer in (("CRD", CRDScorer()), ("NN (exact)", NNScorer())):
        t0 = time.perf_counter()
        scorer.fit(train)
        t1 = time.perf_counter()
        scores = scorer.score(test)
        t2 = time.perf_counter()
        auroc = roc_auc_score(labels, scores.numpy())
        print(f"  {name:<11} AUROC {auroc:.4f}   fit {1e3 * (t1 - t0):8.1f} ms   score {1e3 * (t2 - t1):8.1f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crd-fast", description="Anomaly detection with the Collaborative Representation Distance.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a self-contained demo on generated data (no data, weights or network needed)")
    demo.add_argument("--dim", type=int, default=256)
    demo.add_argument("--n-train", type=int, default=20000)
    demo.add_argument("--n-test", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
