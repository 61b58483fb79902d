"""Each named backbone's forward pass, contiguous against channels_last, timed round-robin in one run (float32).

    cd bench/suites && pytest bench_layout.py -s

The detector runs efficientnet_lite0 channels_last in every precision (``BackboneFamily.channels_last``) and the
other backbones contiguous in float32 (their scores stay bit-identical to earlier model files); this suite is the
measurement behind that choice. Prints and writes ``layout.json``: images per second per backbone and layout, the
ratio channels_last / contiguous, and the machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from crd_fast.benchmark.machine import machine_info
from crd_fast.benchmark.timing import RoundRobin
from crd_fast.features.backbone import FeatureExtractor

BATCH, CROP = 8, 224
ROUNDS = int(os.environ.get("CRD_LAYOUT_ROUNDS", "7"))
#: (backbone, weights): the default backbone with its packaged weights, two ResNets with seeded random weights.
BACKBONES = (("efficientnet_lite0", "imagenet"), ("resnet18", "random"), ("wide_resnet50_2", "random"))
OUT = Path(os.environ.get("CRD_LAYOUT_JSON", "layout.json"))


@pytest.mark.parametrize("backbone, weights", BACKBONES)
def test_channels_last_against_contiguous(benchmark, backbone: str, weights: str) -> None:
    plain = FeatureExtractor(backbone, None, weights, seed=0).eval()
    plain.always_channels_last = False
    plain.set_precision(None)
    fast = FeatureExtractor(backbone, None, weights, seed=0).eval().to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    x_last = x.contiguous(memory_format=torch.channels_last)

    def run(model: torch.nn.Module, inputs: torch.Tensor) -> Any:
        def call() -> Any:
            with torch.inference_mode():
                return model(inputs)

        return call

    rr = RoundRobin({"contiguous": run(plain, x), "channels_last": run(fast, x_last)})
    rr()
    rr.reset()
    benchmark.group = f"backbone layout {CROP}px batch {BATCH}"
    benchmark.pedantic(rr, rounds=ROUNDS, warmup_rounds=0)
    ips = {k: BATCH / t.best for k, t in rr.timings.items()}
    ips_median = {k: BATCH / t.median for k, t in rr.timings.items()}
    result = {
        "backbone": backbone,
        "weights": weights,
        "images_per_s_best": ips,
        "images_per_s_median": ips_median,
        "channels_last_over_contiguous": ips["channels_last"] / ips["contiguous"],
        "channels_last_over_contiguous_median": ips_median["channels_last"] / ips_median["contiguous"],
    }
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {}
    doc["machine"] = machine_info()
    doc.setdefault("backbones", {})[backbone] = result
    OUT.write_text(json.dumps(doc, indent=1))
    print(json.dumps(result, indent=1))
