"""Write the model-file compatibility fixture (run once, with the code whose file format is to be kept).

    cd tests && PYTHONPATH=.. python data/make_compat_fixture.py

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
}


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
    for name, options in CASES.items():
        det = CRDDetector(**options).fit(training_images(), progress=False)
        if name == "patchcore":
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
