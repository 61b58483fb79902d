"""Fitting throughput and memory: ``CRDScorer.partial_fit`` on random patches, one child process per size.

The child is this module run as ``python -m crd_fast.benchmark.fit fit N_IMAGES DIM BATCH SEED``: a fresh
process, so its peak memory is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from ..scorers.crd import CRDScorer
from .inputs import random_patches


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process image. Not ru_maxrss: Linux
    carries ru_maxrss over fork + exec, so a child started by a big parent (a pytest run holding a 1 GB
    bank) would report the parent's size. Elsewhere: ru_maxrss (KB on Linux/BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024.0


def fit_run(
    n_images: int, dim: int = 1536, batch: int = 8, patches_per_image: int = 784, seed: int = 0
) -> dict[str, Any]:
    """Stream ``n_images`` images of random patches through ``CRDScorer.partial_fit``, in this process.

    Only the partial_fit calls are timed (not the random generation); the one d x d solve that turns
    the statistics into M_pre is timed apart (``solve_s``). Returns patches/s, the seconds,
    the peak RSS before the first call and at the end (MB), and the bytes an NN bank of the same patches
    would hold, for contrast.
    """
    if n_images < 1 or batch < 1:
        raise ValueError(f"n_images and batch must be positive, got {n_images}, {batch}")
    scorer = CRDScorer()
    first = random_patches(batch * patches_per_image, dim, seed=seed)  # allocate the batch-sized buffers once
    rss_before = peak_rss_mb()
    seconds = 0.0
    for i, start in enumerate(range(0, n_images, batch)):
        rows = first if i == 0 else random_patches(min(batch, n_images - start) * patches_per_image, dim, seed=seed + i)
        rows = rows[: min(batch, n_images - start) * patches_per_image]
        t0 = time.perf_counter()
        scorer.partial_fit(rows)
        seconds += time.perf_counter() - t0
        del rows
    t0 = time.perf_counter()
    scorer.projection  # noqa: B018 - the d x d solve (eigendecomposition): a fixed cost, timed apart
    solve = time.perf_counter() - t0
    n_patches = n_images * patches_per_image
    return {
        "n_images": n_images,
        "n_patches": n_patches,
        "dim": dim,
        "seconds": seconds,
        "patches_per_s": n_patches / seconds,
        "solve_s": solve,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "nn_bank_mb": n_patches * dim * 4 / 1e6,
        "crd_state_mb": (2 * dim * dim + 2 * dim) * 8 / 1e6,
    }


def fit_in_subprocess(
    n_images: int,
    dim: int = 1536,
    batch: int = 8,
    seed: int = 0,
    timeout: float = 1800.0,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """``fit_run`` in a fresh Python process, so its peak memory is its own (not the caller's)."""
    cmd = [sys.executable, "-m", "crd_fast.benchmark.fit", "fit", str(n_images), str(dim), str(batch), str(seed)]
    env = dict(os.environ)
    if threads is not None:
        env["CRD_BENCH_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fit benchmark child failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fit_child(argv: Sequence[str]) -> None:
    threads = os.environ.get("CRD_BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    n_images, dim, batch, seed = (int(a) for a in argv)
    print(json.dumps(fit_run(n_images, dim, batch, seed=seed)))


if __name__ == "__main__":  # the child process of fit_in_subprocess
    if len(sys.argv) == 6 and sys.argv[1] == "fit":
        _fit_child(sys.argv[2:])
    else:
        sys.exit("usage: python -m crd_fast.benchmark.fit fit N_IMAGES DIM BATCH SEED")
