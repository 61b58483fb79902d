"""Model files written before a change load after it and give the very same scores and maps.

tests/data/compat_*.crd were written by tests/data/make_compat_fixture.py with the code of that time,
beside the scores and maps it gave (compat_*.npz) on the machine of that time. On one processor the whole
CPU pipeline (seeded random backbone, float32 convolutions, the CRD head) is deterministic, and there the
outputs match bit for bit. oneDNN's float32 convolutions block their sums by the processor's caches and
instruction set, though, so on another processor the same code and file give outputs that differ in the
last bits (an Intel Xeon with AVX10.1: 22% of the map values, at most 7e-7 relative). The comparison
therefore allows ``ULPS`` float32 units of the largest value and nothing more: any change of file format or
arithmetic in crd-fast moves outputs far more than that, and must be deliberate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crd_fast import CRDDetector

DATA = Path(__file__).resolve().parent / "data"
#: concat and patchcore: global CRD models from before the spatial option; local and auto: the position-aware model
#: (explicit options, and chosen without labels, with its selection record) from before the scoring-model interface.
CASES = ("concat", "patchcore", "local", "auto")
#: Files whose re-save must keep every field (written before the spatial option, which added fields since).
RESAVE_CASES = ("concat", "patchcore")
#: float32 units in the last place (of the largest expected value) a processor change may move an output by.
ULPS = 16


def _same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding of the summation order (``ULPS``); see the module docstring."""
    expected_t = torch.from_numpy(expected)
    scale = float(expected_t.abs().max()) if expected_t.numel() else 0.0
    atol = ULPS * float(np.spacing(np.float32(scale))) if scale else 0.0
    torch.testing.assert_close(torch.from_numpy(np.asarray(actual)), expected_t, rtol=0, atol=atol)


@pytest.mark.parametrize("name", CASES)
def test_old_model_file_loads_with_identical_scores(name):
    expected = np.load(DATA / f"compat_{name}.npz")
    det = CRDDetector.load(DATA / f"compat_{name}.crd")
    result = det.predict(list(expected["inputs"]), progress=False)
    _same(result.image_scores, expected["image_scores"])
    _same(result.anomaly_maps, expected["anomaly_maps"])
    _same(result.patch_maps, expected["patch_maps"])
    if "labels" in expected:
        _same(result.normalized_scores, expected["normalized_scores"])
        np.testing.assert_array_equal(result.labels, expected["labels"])
    else:
        assert result.labels is None and det.threshold is None


@pytest.mark.parametrize("name", RESAVE_CASES)
def test_old_model_file_resaves_to_the_same_content(name, tmp_path):
    """Loading and saving again keeps every tensor and metadata field (the format did not change) but the deliberate
    additions since, listed below; the re-saved file's header is covered by its digest, the old file's is not."""
    from safetensors import safe_open

    from crd_fast.io.model_file import DIGEST_KEY, digest_kind, header_digest, read_model_file

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
    # signed headers: the old file is of the older digest kind (its tensors only), the re-saved one covers its header
    assert digest_kind(old_meta) == "tensors" and "digest" not in old_meta
    assert digest_kind(new_meta) == "header+tensors" and new_meta.pop("digest") == "header+tensors"
    with safe_open(str(tmp_path / "again.crd"), framework="pt") as fh:
        raw = fh.metadata()
    assert raw[DIGEST_KEY] == header_digest(raw["crd_fast"])
    with safe_open(str(DATA / f"compat_{name}.crd"), framework="pt") as fh:
        assert DIGEST_KEY not in fh.metadata()
    assert new_meta == old_meta
    assert sorted(new_tensors) == sorted(old_tensors)
    for key, tensor in old_tensors.items():
        torch.testing.assert_close(new_tensors[key], tensor, rtol=0, atol=0)
