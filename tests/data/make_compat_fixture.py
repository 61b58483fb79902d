"""Write the model-file compatibility fixture (run once, with the code whose file format is to be kept).

    cd tests && PYTHONPATH=.. python data/make_compat_fixture.py [CASE ...]   # default: every case

Each file keeps the format of the code that wrote it, so write only the cases that are new (naming them):
``concat`` and ``patchcore`` (global CRD models) were written before the spatial option existed, ``local`` and
``auto`` (the position-aware model, fixed and chosen without labels) before the scoring-model interface.

For each case in ``CASES`` it fits a small seeded-random-weights detector on generated images and writes
``compat_<name>.crd`` (the model file) and ``compat_<name>.npz`` (the inputs and the scores and maps that
model gave for them). tests/test_compat.py loads the files with the current code and asserts the same
outputs, so a change that breaks old model files or changes their scores fails there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from crd_fast import CRDDetector
from crd_fast.synthetic.dataset import render_sample

HERE = Path(__file__).resolve().parent
SIZE = 64

#: Two option sets that together take every branch of the model file: concat and patchcore, centred and
#: not, full rank and rank-limited, with and without a threshold.
CASES = {
    "concat": dict(
        backbone="resnet18",
        weights="random",
        seed=3,
        layers=("layer2",),
        embedding="concat",
        lam_rel=0.05,
        center=False,
        rank=None,
        resize=64,
        crop=56,
        blur_sigma=2.0,
        batch_size=3,
    ),
    "patchcore": dict(
        backbone="resnet18",
        weights="random",
        seed=5,
        layers=("layer1", "layer2"),
        embedding="patchcore",
        target_dim=96,
        lam_rel=0.01,
        center=True,
        rank=40,
        resize=72,
        crop=64,
        blur_sigma=0.0,
        batch_size=4,
    ),
    # the position-aware model with explicit options, and both chosen without labels (>= 20 images)
    "local": dict(
        backbone="resnet18",
        weights="random",
        seed=7,
        layers=("layer1", "layer2"),
        embedding="concat",
        lam_rel=0.003,
        spatial="local",
        local_rank=3,
        local_shrinkage=0.25,
        resize=64,
        crop=48,
        blur_sigma=1.0,
        batch_size=4,
    ),
    "auto": dict(
        backbone="resnet18",
        weights="random",
        seed=9,
        layers=("layer2",),
        embedding="concat",
        lam_rel="auto",
        spatial="auto",
        local_rank=4,
        resize=64,
        crop=64,
        blur_sigma=2.0,
        batch_size=8,
    ),
}
#: Training images per case (the label-free choice needs at least 20).
N_TRAIN = {"auto": 24}


def training_images(n: int = 6) -> list[np.ndarray]:
    return [render_sample("fabric", SIZE, seed=11, index=i, split="train")[0] for i in range(n)]


def test_images() -> np.ndarray:
    """Two good and two defective generated images, (4, H, W, 3) uint8."""
    good = [render_sample("fabric", SIZE, seed=11, index=i)[0] for i in range(2)]
    bad = [render_sample("fabric", SIZE, seed=11, defect=d, index=0)[0] for d in ("scratch", "hole")]
    return np.stack(good + bad)


def main() -> int:
    torch.set_num_threads(1)
    inputs = test_images()
    names = sys.argv[1:] or list(CASES)
    for name in names:
        options = CASES[name]
        det = CRDDetector(**options).fit(training_images(N_TRAIN.get(name, 6)), progress=False)
        if name in ("patchcore", "local"):
            det.set_threshold(1.25)
        det.save(HERE / f"compat_{name}.crd")
        result = det.predict(list(inputs), progress=False)
        extra = (
            {} if result.labels is None else {"normalized_scores": result.normalized_scores, "labels": result.labels}
        )
        np.savez_compressed(
            HERE / f"compat_{name}.npz",
            inputs=inputs,
            image_scores=result.image_scores,
            anomaly_maps=result.anomaly_maps,
            patch_maps=result.patch_maps,
            **extra,
        )
        print(f"wrote compat_{name}.crd / .npz: d={det.dim}, scores {result.image_scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
