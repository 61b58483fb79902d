"""Small fitted detectors shared by the deployment tests (resnet18 with seeded random weights, 64 px images).

Random weights: these tests check that export and runtime reproduce the detector, not accuracy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from crd_fast.synthetic import render_sample

CROP = 64
TARGET_DIM = 96  # patchcore embedding d (layer2 + layer3 of resnet18 have 128 + 256 channels)


def demo_images(n: int, defect: bool = False, size: int = 72) -> list[np.ndarray]:
    """Synthetic "fabric" images (the demo data), uint8 (size, size, 3)."""
    kind = "hole" if defect else None
    return [
        render_sample("fabric", size=size, seed=1, defect=kind, index=i, split="test" if defect else "train")[0]
        for i in range(n)
    ]


@lru_cache(maxsize=None)
def fitted_detector(embedding: str):
    """A fitted resnet18 detector (random weights) with a threshold between its normal and defective scores."""
    from crd_fast.detector.detector import CRDDetector

    det = CRDDetector(
        backbone="resnet18",
        weights="random",
        resize=CROP,
        crop=CROP,
        embedding=embedding,
        target_dim=TARGET_DIM,
        batch_size=4,
    )
    det.fit(demo_images(6), progress=False)
    det.set_threshold(
        float(np.median(det.predict(demo_images(3, defect=True) + demo_images(3), progress=False).image_scores))
    )
    return det
