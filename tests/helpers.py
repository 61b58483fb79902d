"""Helpers shared by several test modules: the CUDA skip marker, a random patch bank, CLI and torchrun arguments.

Imported as a plain module (``from helpers import cuda, random_bank``): pytest puts this folder on
``sys.path`` (rootdir-relative "prepend" import mode), as it does for ``deploy_fixtures``. Fixtures live
in conftest.py, which tests never import.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

#: Marks a test that needs a CUDA device; skipped (with the reason) on machines without one.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_bank(rng: np.random.Generator, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    """n correlated Gaussian patches of dimension d (float64), with a decaying spectrum like CNN features."""
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))
    mixing = rng.standard_normal((d, d)) * scales[None, :]
    return rng.standard_normal((n, d)) @ mixing.T + offset


def cli_detector_args(px: int, batch_size: int) -> list[str]:
    """The small, fast detector the CLI tests fit: random resnet18 at ``px`` pixels, no progress bars."""
    return ["--backbone", "resnet18", "--weights", "random", "--resize", str(px), "--crop", str(px),
            "--batch-size", str(batch_size), "--no-progress"]  # fmt: skip


def small_fabric(root: Path, px: int) -> Path:
    """A tiny generated "fabric" category (4 training, 2 good + 2 defective test images at ``px``) under ``root``."""
    from crd_fast.synthetic import generate_dataset

    generate_dataset(root, categories=("fabric",), n_train=4, n_test_good=2, n_test_defect=2, size=px, seed=3)
    return root / "fabric"


def fit_with_cli(data: Path, path: Path, detector_args: list[str]) -> Path:
    """``crd-fast fit data -o path --threshold 1.0`` with ``detector_args``; the model's path."""
    from crd_fast.cli.main import main

    assert main(["fit", str(data), "-o", str(path), "--threshold", "1.0", *detector_args]) == 0
    return path


def torchrun_command(nproc: int, *extra: str) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local ranks on a free loopback port, then ``extra``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), *extra]  # fmt: skip


def dense_local_scores(train: torch.Tensor, test: torch.Tensor, a: float, k: int, lam_rel: float) -> torch.Tensor:
    """The local CRD's float64 specification, written densely (docs/DESIGN.md "Position-aware CRD").

    lam ||(S_p + lam I)^-1 (y - mu_p)|| with S_p = a C + (1 - a) V_p E_p V_p^T, C_p's top-k eigenpairs (V_p, E_p)
    from a dense eigh, C = mean_p C_p and lam = lam_rel * trace(C) / d; ``train`` (N, P, d), ``test`` (M, P, d)
    -> (M, P), all by dense solves.
    """
    train, test = train.to(torch.float64), test.to(torch.float64)
    n, p, d = train.shape
    mu = train.mean(0)
    xc = train - mu
    cps = torch.einsum("npd,npe->pde", xc, xc) / n
    pooled = cps.mean(0)
    lam = lam_rel * float(torch.trace(pooled)) / d
    kk = min(k, d)
    out = torch.empty(test.shape[0], p, dtype=torch.float64)
    for j in range(p):
        evals, evecs = torch.linalg.eigh(cps[j])
        v, e = evecs[:, -kk:], evals[-kk:].clamp_min(0)
        s = a * pooled + (1 - a) * (v * e) @ v.T + lam * torch.eye(d, dtype=torch.float64)
        out[:, j] = lam * torch.linalg.vector_norm(torch.linalg.solve(s, (test[:, j] - mu[j]).T).T, dim=1)
    return out


def _drop_permission_override() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that
    root's exec'd program is bound by file permissions like any user (prctl PR_CAPBSET_DROP)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_unprivileged(script: str, folder, env: dict) -> subprocess.CompletedProcess:
    """Run ``python -c script`` in ``folder`` bound by file permissions (root ignores them: its override is dropped
    first); skips the test where that is impossible here (no CAP_SETPCAP)."""
    kwargs = {"preexec_fn": _drop_permission_override} if os.geteuid() == 0 else {}
    try:
        return subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=folder, **kwargs
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process bound by file permissions did not finish: {exc}")
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot run a process bound by file permissions here: {exc}")
