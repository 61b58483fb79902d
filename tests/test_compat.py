"""Model files written before a change load after it and give the very same scores and maps.

tests/data/compat_*.crd were written by tests/data/make_compat_fixture.py with the code of that time,
beside the scores and maps it gave (compat_*.npz). The comparison is exact (rtol=0, atol=0): on the
CPU the whole pipeline (seeded random backbone, float32 convolutions, the CRD head) is deterministic,
so any difference means a changed file format or changed arithmetic -- which must be deliberate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crd_fast import CRDDetector

DATA = Path(__file__).resolve().parent / "data"
CASES = ("concat", "patchcore")


def _exact(actual: np.ndarray, expected: np.ndarray) -> None:
    torch.testing.assert_close(torch.from_numpy(np.asarray(actual)), torch.from_numpy(expected), rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_old_model_file_loads_with_identical_scores(name):
    expected = np.load(DATA / f"compat_{name}.npz")
    det = CRDDetector.load(DATA / f"compat_{name}.crd")
    result = det.predict(list(expected["inputs"]), progress=False)
    _exact(result.image_scores, expected["image_scores"])
    _exact(result.anomaly_maps, expected["anomaly_maps"])
    _exact(result.patch_maps, expected["patch_maps"])
    if "labels" in expected:
        _exact(result.normalized_scores, expected["normalized_scores"])
        np.testing.assert_array_equal(result.labels, expected["labels"])
    else:
        assert result.labels is None and det.threshold is None


@pytest.mark.parametrize("name", CASES)
def test_old_model_file_resaves_to_the_same_content(name, tmp_path):
    """Loading and saving again keeps every tensor and metadata field (the format did not change)."""
    from crd_fast.io.model_file import read_model_file

    det = CRDDetector.load(DATA / f"compat_{name}.crd")
    det.save(tmp_path / "again.crd")
    old_tensors, old_meta = read_model_file(DATA / f"compat_{name}.crd", "crd_detector")
    new_tensors, new_meta = read_model_file(tmp_path / "again.crd", "crd_detector")
    # the deliberate additions since: the compute precision option (files without it load as fp32) and the
    # spatial model's options (files without them are global CRD models: they load as spatial "global")
    assert "precision" not in old_meta["config"] and new_meta["config"].pop("precision") == "fp32"
    added = {name: new_meta["config"].pop(name) for name in ("spatial", "local_rank", "local_shrinkage")}
    assert added == {"spatial": "global", "local_rank": 32, "local_shrinkage": 0.5}
    assert not {"spatial", "spatial_choice", "selection", "local"} & (set(old_meta) | set(old_meta["config"]))
    assert new_meta == old_meta
    assert sorted(new_tensors) == sorted(old_tensors)
    for key, tensor in old_tensors.items():
        torch.testing.assert_close(new_tensors[key], tensor, rtol=0, atol=0)
