"""Fit benchmark: patches/s and peak memory of CRDScorer.partial_fit as the training set grows.

    cd bench/suites && python -m pytest bench_fit.py -s --benchmark-columns=min,rounds

Each size (50, 200, 1,000 images of 784 patches, d = 1536) runs in its own Python process
(``crd_fast.benchmark.fit.fit_in_subprocess``), which streams random patches batch by batch (8 images)
through ``partial_fit`` and reports its peak RSS (VmHWM; see ``peak_rss_mb`` there) before and after fitting. CRD keeps
only the d x d float64 statistics, so the peak does not grow with the number of images; the NN memory bank
the same patches would need is shown for contrast. pytest-benchmark's time includes the process start;
patches/s counts only the partial_fit calls.
"""

from __future__ import annotations

import pytest

from crd_fast.benchmark.config import BenchConfig
from crd_fast.benchmark.fit import fit_in_subprocess

_CFG = BenchConfig.from_env()


@pytest.mark.parametrize("n_images", _CFG.fit_sizes)
def test_fit(benchmark, n_images: int, bench_config: BenchConfig, recorder) -> None:
    benchmark.group = f"fit d={bench_config.fit_dim}"
    out = benchmark.pedantic(fit_in_subprocess, args=(n_images, bench_config.fit_dim), rounds=1, iterations=1)
    recorder.extra["fit"].append(out)
    benchmark.extra_info.update({k: out[k] for k in ("patches_per_s", "peak_rss_mb", "rss_before_mb", "nn_bank_mb")})


def test_memory_flat(recorder) -> None:
    """Peak memory of the largest fit stays within 100 MB of the smallest (an NN bank grows by GBs)."""
    fits = sorted(recorder.extra["fit"], key=lambda f: f["n_images"])
    if len(fits) < 2:
        pytest.skip("needs the fit benchmarks of at least two sizes in this run")
    growth = fits[-1]["peak_rss_mb"] - fits[0]["peak_rss_mb"]
    print(
        f"\npeak RSS {fits[0]['n_images']} images: {fits[0]['peak_rss_mb']:.0f} MB; {fits[-1]['n_images']} images: "
        f"{fits[-1]['peak_rss_mb']:.0f} MB; an NN bank would grow by "
        f"{fits[-1]['nn_bank_mb'] - fits[0]['nn_bank_mb']:.0f} MB"
    )
    assert growth < 100.0
