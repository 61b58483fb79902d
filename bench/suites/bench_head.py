"""Head benchmark: fused CRD head vs the unfused float32 reference vs exact nearest-neighbour search.

    cd bench/suites && python -m pytest bench_head.py -s --benchmark-columns=min,median,rounds

All paths score the SAME 8 query images (random wide_resnet50_2-shaped feature maps, layer2 512 x 28 x 28
and layer3 1024 x 14 x 14): the CRD paths from the feature maps with the scorer's float32 M_pre; the NN
paths embed the same maps (as the reference does) and search a bank of 1%, 10% or 100% of the patches of
200 training images (156,800 patches), with faiss IndexFlatL2 and with NNScorer's chunked torch matmul.
d = 1536 ("concat") and d = 1024 ("patchcore"). The ratio table at the end compares best-of-rounds times.
"""

from __future__ import annotations

import pytest
import torch

from crd_fast.benchmark.config import SCORE_RTOL, BenchConfig
from crd_fast.benchmark.paths import (
    HeadCase,
    fused_path,
    make_head_case,
    max_relative_error,
    nn_path,
    nn_scorer,
    reference_path,
)
from crd_fast.benchmark.table import head_key, nn_name
from crd_fast.benchmark.timing import RoundRobin
from crd_fast.ops import reference

_CFG = BenchConfig.from_env()


@pytest.fixture(scope="module", params=_CFG.embeddings)
def case(request: pytest.FixtureRequest, bench_config: BenchConfig, recorder) -> HeadCase:
    """Bank, fitted scorer and query maps of one embedding (one at a time: the 100% bank is ~1 GB)."""
    c = make_head_case(request.param, n_train=bench_config.n_train, n_query=bench_config.n_query)
    recorder.extra["head_sizes"][c.embedding] = (c.n_query_images, int(c.bank.shape[0]), c.dim)
    yield c
    del c


def test_same_scores(case: HeadCase, recorder) -> None:
    """The timed paths compute the same scores: fused == reference (float32) within 1e-4 relative,
    both close to the float64 specification, and the NN path scores the same patches."""
    fused = fused_path(case)()
    ref32 = reference_path(case)()
    ref64 = reference.crd_head(
        case.maps, case.scorer.projection.matrix, case.scorer.projection.offset, case.embedding, case.target_dim
    )
    err = max_relative_error(fused, ref32)
    recorder.extra["errors"][case.embedding] = err
    assert err <= SCORE_RTOL
    assert max_relative_error(fused, ref64) <= SCORE_RTOL
    crd_rows = case.scorer.score(case.patches.double()).reshape(fused.shape)
    assert torch.allclose(crd_rows, ref64, rtol=1e-5)  # the NN rows were embedded in float32


def test_fused_and_reference(benchmark, case: HeadCase, bench_config: BenchConfig, recorder) -> None:
    """Fused op and float32 reference, timed round-robin (one pytest-benchmark round = one call of each)."""
    rr = RoundRobin({"fused": fused_path(case), "reference": reference_path(case)})
    rr()  # warm-up (caches of folded matrices and plans), not recorded
    rr.reset()
    benchmark.group = f"head {case.embedding} d={case.dim}"
    benchmark.pedantic(rr, rounds=bench_config.rounds, warmup_rounds=0)
    if getattr(benchmark, "stats", None) is not None:
        recorder.record_rounds(head_key(case.embedding, ""), rr)
    for name, t in rr.timings.items():
        benchmark.extra_info[f"{name}_best_ms"] = t.best * 1e3
        benchmark.extra_info[f"{name}_median_ms"] = t.median * 1e3


@pytest.mark.parametrize("backend", _CFG.backends)
@pytest.mark.parametrize("fraction", _CFG.fractions, ids=lambda f: f"{f * 100:g}%")
def test_nn(benchmark, case: HeadCase, fraction: float, backend: str, bench_config: BenchConfig, recorder) -> None:
    if backend == "faiss":
        pytest.importorskip("faiss")
    scorer = nn_scorer(case, fraction, backend)  # bank subsampled, index built: not timed
    benchmark.group = f"head {case.embedding} d={case.dim}"
    benchmark.extra_info["bank_patches"] = scorer.n_samples
    benchmark.extra_info["bank_mb"] = scorer.nbytes / 1e6
    # exact NN over the 100% bank takes about a minute per call on 2 cores: few rounds, no warm-up
    # (the first call is not special: the index was built above).
    benchmark.pedantic(nn_path(case, scorer), rounds=bench_config.rounds_for(fraction), warmup_rounds=0)
    recorder.record(head_key(case.embedding, nn_name(backend, fraction)), benchmark)
