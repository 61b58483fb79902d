"""A third scoring model, added in this one file, works everywhere the built-in ones do (docs/DESIGN.md "A new
scoring model").

``PositionMean`` scores a patch by its plain distance to the mean patch at its grid position, ||y - mu_p||: a
model unlike both built-in ones (no covariance, no lam_rel). It is registered here (``@register``) and nowhere
else, and then fits, predicts, saves, loads, exports to ONNX and fits distributed (two torchrun ranks) through
the public API, each checked against the float64 formula or the single-process fit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import torchrun_command

from crd_fast import CRDDetector, ModelFileError
from crd_fast.core.embedding import embed_patches, patch_grids
from crd_fast.deploy import OnnxDetector, export_onnx, make_head_file
from crd_fast.io.model_file import PathLike, require
from crd_fast.scoring import FeatureLayout, ScoringModel, register


class PositionMeanHead(nn.Module):
    """Feature maps -> (B, h, w) distances to the per-position means (pure torch, exportable)."""

    use_fused = False

    def __init__(self, means: torch.Tensor, layout: FeatureLayout) -> None:
        super().__init__()
        self.embedding, self.target_dim = layout.embedding, layout.target_dim
        h, w = layout.patch_grid
        self.register_buffer("means", means.T.reshape(-1, h, w).float().contiguous())  # (d, h, w)

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.torch_forward(feature_maps)

    def torch_forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        patches = embed_patches(list(feature_maps), self.embedding, self.target_dim)
        return (patches - self.means.to(patches.dtype)).square().sum(1).sqrt()

    def half_weights(self) -> list[torch.Tensor]:
        return []


@register
class PositionMean(ScoringModel):
    """score_p(y) = ||y - mu_p||, mu_p the mean training patch at grid position p (float64 sums)."""

    name = "position_mean"

    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None  # (P, d) float64
        self.images = 0

    @classmethod
    def create(cls, options: Mapping[str, Any]) -> "PositionMean":
        return cls()

    def fresh(self) -> "PositionMean":
        return PositionMean()

    def partial_fit(self, grids: torch.Tensor) -> None:
        total = grids.detach().to("cpu", torch.float64).sum(0)
        self.sums = total if self.sums is None else self.sums + total
        self.images += int(grids.shape[0])

    def merge(self, other: ScoringModel) -> "PositionMean":
        if isinstance(other, PositionMean) and other.sums is not None:
            self.sums = other.sums.clone() if self.sums is None else self.sums + other.sums
            self.images += other.images
        return self

    is_fitted = property(lambda self: self.images >= 1)
    n_patches = property(lambda self: 0 if self.sums is None else self.images * self.sums.shape[0])
    dim = property(lambda self: None if self.sums is None else int(self.sums.shape[1]))
    positions = property(lambda self: None if self.sums is None else int(self.sums.shape[0]))

    def head(self, layout: FeatureLayout, use_fused: bool = True) -> nn.Module:
        return PositionMeanHead(self.sums / self.images, layout)

    def cache_key(self) -> Hashable:
        return self.images

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"mean.sums": self.sums}, {"mean": {"images": self.images}}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], path: PathLike) -> ScoringModel:
        sums, fields = tensors.get("mean.sums"), meta.get("mean") or {}
        require(sums is not None and sums.dtype == torch.float64 and sums.ndim == 2, path, "no float64 'mean.sums'")
        require(bool(torch.isfinite(sums).all()), path, "'mean.sums' holds NaN or Inf")
        images = fields.get("images")
        require(isinstance(images, int) and images >= 1, path, f"images={images!r} is not a count >= 1")
        model = cls()
        model.sums, model.images = sums.clone(), images
        return model


OPTIONS = dict(backbone="resnet18", weights="random", layers=("layer2",), resize=40, crop=32, batch_size=3)
#: One image per forward pass: float32 features then do not depend on how the ranks group the images.
ONE_BY_ONE = dict(OPTIONS, batch_size=1, spatial="position_mean")


def images(seed: int, n: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [(g.random((40, 44, 3)) * 255).astype(np.uint8) for _ in range(n)]


def expected_maps(det: CRDDetector, train: list[np.ndarray], test: list[np.ndarray]) -> np.ndarray:
    """The float64 formula on the detector's own embeddings: ||y - mean of the training patches at p||."""
    grids = [patch_grids(det.embed(torch.stack([det.preprocess(im) for im in ims]))).double() for ims in (train, test)]
    means = grids[0].mean(0)
    h, w = det.patch_grid
    return (grids[1] - means).norm(dim=-1).reshape(-1, h, w).numpy()


@pytest.fixture(scope="module")
def fitted() -> CRDDetector:
    return CRDDetector(**OPTIONS, spatial="position_mean").fit(images(1, 7), progress=False)


def test_the_model_is_an_option_of_the_detector_and_not_a_candidate_of_auto(fitted):
    from crd_fast.scoring import model_names, selectable_names

    assert "position_mean" in model_names() and "position_mean" not in selectable_names()
    assert fitted.spatial_choice == "position_mean" and fitted.lam_rel is None and fitted.selection is None
    with pytest.raises(ValueError, match="has no lam_rel"):
        CRDDetector(**OPTIONS, spatial="position_mean", lam_rel=0.01)


def test_fit_and_predict_give_the_float64_formula(fitted):
    test = images(2, 4)
    result = fitted.predict(test, progress=False)
    want = expected_maps(fitted, images(1, 7), test)
    np.testing.assert_allclose(result.patch_maps, want, rtol=1e-5, atol=1e-6 * want.max())
    np.testing.assert_allclose(result.image_scores, want.reshape(4, -1).max(1), rtol=1e-5)
    assert fitted.train_score_stats["n"] == 7


def test_save_then_load_gives_identical_scores(fitted, tmp_path):
    fitted.set_threshold(float(np.median(fitted.predict(images(3, 3), progress=False).image_scores)))
    fitted.save(tmp_path / "m.crd")
    loaded = CRDDetector.load(tmp_path / "m.crd")
    assert loaded.spatial_choice == "position_mean" and loaded.n_images == 7
    a, b = fitted.predict(images(3, 3), progress=False), loaded.predict(images(3, 3), progress=False)
    for key in ("image_scores", "anomaly_maps", "patch_maps", "normalized_scores"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    loaded.partial_fit(images(4, 2), progress=False)  # an online update keeps the model
    assert loaded.n_images == 9 and loaded.model.images == 9


def test_a_tampered_file_is_refused(fitted, tmp_path):
    from crd_fast.io.model_file import read_model_file, write_model_file

    fitted.save(tmp_path / "m.crd")
    tensors, meta = read_model_file(tmp_path / "m.crd", "crd_detector")
    keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "crd_fast_version", "kind")}
    keep.pop("checksum", None)
    bad = {"mean.sums": tensors["mean.sums"].float()}
    write_model_file(tmp_path / "bad.crd", "crd_detector", bad, keep, check=None)  # tampered on purpose
    with pytest.raises(ModelFileError, match="no float64 'mean.sums'"):
        CRDDetector.load(tmp_path / "bad.crd")


def test_onnx_export_scores_as_the_detector(fitted, tmp_path):
    result = export_onnx(fitted, tmp_path / "m.onnx")
    assert result.metadata["spatial"] == "position_mean" and result.metadata["lam"] is None
    test = images(5, 3)
    want = fitted.predict(test, progress=False)
    got = OnnxDetector(tmp_path / "m.onnx").predict(test)
    np.testing.assert_allclose(got.patch_maps, want.patch_maps, rtol=1e-4, atol=1e-5 * want.patch_maps.max())
    with pytest.raises(ValueError, match="no head file form"):
        make_head_file(fitted, tmp_path / "h.crdh")


# ---- distributed: two torchrun ranks, this file as the worker --------------------------------------------
@pytest.mark.slow
def test_two_rank_fit_equals_single_process_fit(tmp_path):
    train = images(6, 9)
    single = CRDDetector(**ONE_BY_ONE).fit(train, progress=False)
    cmd = [*torchrun_command(2), os.path.abspath(__file__), "worker", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    both = CRDDetector.load(tmp_path / "dist.crd")
    assert both.n_images == 9 and both.model.images == 9
    torch.testing.assert_close(both.model.sums, single.model.sums, rtol=1e-12, atol=1e-9)
    assert both.train_score_stats == pytest.approx(single.train_score_stats, rel=1e-5)


def _worker(out: str) -> None:
    from crd_fast.distributed import distributed_session, fit_distributed

    torch.set_num_threads(1)
    with distributed_session(backend="gloo", timeout_s=60):
        det = CRDDetector(**ONE_BY_ONE)
        fit_distributed(det, images(6, 9), save_path=Path(out) / "dist.crd")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
