"""The targets' arithmetic on made-up timings (no timing here): ratios, verdicts and the caveats of quick runs.

cd bench/suites && python -m pytest bench_targets.py
"""

from __future__ import annotations

import pytest
from targets import TARGET_BANK_PATCHES, format_targets, targets

from crd_fast.benchmark.table import head_key, nn_name
from crd_fast.benchmark.timing import Timing


def test_targets_from_results() -> None:
    T = Timing
    results = {
        head_key("concat", "fused"): T([0.2, 0.3]),
        head_key("concat", "reference"): T([0.5, 0.6]),
        head_key("concat", nn_name("faiss", 1.0)): T([40.0]),
        head_key("concat", nn_name("torch", 1.0)): T([50.0]),
        "e2e/backbone": T([4.0]),
        "e2e/head": T([0.3]),
        "e2e/full": T([4.5]),
    }
    extra = {
        "head_sizes": {"concat": (8, TARGET_BANK_PATCHES, 1536)},
        "errors": {"concat": 3e-7},
        "e2e": {"backbone": "wide_resnet50_2", "crop": 224, "batch": 8},
    }
    fused, nn, share = targets(results, extra)
    assert fused.value == pytest.approx(2.5) and fused.median_value == pytest.approx(0.55 / 0.25) and fused.met
    assert nn.value == pytest.approx(200.0) and nn.met and "faiss" in nn.name  # the faster NN backend
    assert share.value == pytest.approx(0.3 / 4.5) and share.met
    slow = dict(results, **{"e2e/head": T([1.0])})
    assert targets(slow, extra)[2].met is False and "MISSED" in targets(slow, extra)[2].line()
    quick = dict(extra, head_sizes={"concat": (8, 1000, 1536)})
    small_bank = targets(results, quick)[1]
    assert small_bank.met is None and "not comparable" in small_bank.line()
    assert "defined for 156,800" in small_bank.line()
    assert "[met]" in format_targets(results, extra) and "200.0x" in format_targets(results, extra)
    assert targets({})[0].met is None and "not measured" in targets({})[0].line()
