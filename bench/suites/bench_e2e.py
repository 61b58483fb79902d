"""End to end: images/s of the whole detector vs the backbone alone, so the CRD head's share shows.

    cd bench/suites && python -m pytest bench_e2e.py -s --benchmark-columns=min,median,rounds

A CRDDetector (wide_resnet50_2 with seeded random weights: throughput does not depend on the values;
224 px, batch 8) is fitted on a few random images; its ``inference_model()`` (backbone + CRD head +
anomaly map + image score) is timed against ``model.extractor`` (backbone only) and ``model.head`` (the
CRD head on the backbone's maps, which uses the fused op in eager mode), the three timed round-robin.
"""

from __future__ import annotations

import pytest
import torch

from crd_fast.benchmark.config import BenchConfig
from crd_fast.benchmark.paths import EndToEndCase, e2e_paths, make_e2e_case
from crd_fast.benchmark.timing import RoundRobin


@pytest.fixture(scope="module")
def e2e(bench_config: BenchConfig, recorder) -> EndToEndCase:
    c = make_e2e_case(bench_config.e2e_backbone, bench_config.e2e_crop, bench_config.e2e_batch)
    recorder.extra["e2e"] = {"backbone": c.backbone, "crop": c.crop, "batch": c.batch}
    return c


def test_head_matches_model(e2e: EndToEndCase) -> None:
    """The timed head is the model's: its output equals the patch maps of the full forward."""
    paths = e2e_paths(e2e)
    _, _, patch_maps = paths["full"]()
    torch.testing.assert_close(paths["head"](), patch_maps)


def test_e2e(benchmark, e2e: EndToEndCase, bench_config: BenchConfig, recorder) -> None:
    """Backbone, head and full model timed round-robin (one pytest-benchmark round = one call of each):
    the shared machine's load changes over minutes, and the head's share is a ratio of these times."""
    rr = RoundRobin(e2e_paths(e2e))
    rr()  # warm-up, not recorded
    rr.reset()
    benchmark.group = f"end to end {e2e.backbone} {e2e.crop}px batch {e2e.batch}"
    benchmark.pedantic(rr, rounds=bench_config.e2e_rounds, warmup_rounds=0)
    if getattr(benchmark, "stats", None) is not None:
        recorder.record_rounds("e2e/", rr)
    for name, t in rr.timings.items():
        benchmark.extra_info[f"{name}_images_per_s_best"] = e2e.batch / t.best
        benchmark.extra_info[f"{name}_images_per_s_median"] = e2e.batch / t.median
