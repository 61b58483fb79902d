"""CRDDetector end to end on small generated textures with a seeded random resnet18."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crd_fast import CRDDetector, CRDScorer, DetectionResult, ModelFileError
from crd_fast.core.embedding import patch_matrix
from crd_fast.detector import OPTIONS, DetectorConfig, Reservoir
from crd_fast.detector.detector import SCORE_SAMPLE
from crd_fast.features import BackboneWeightsError, ImageReadError
from crd_fast.scoring import GlobalCRD, LocalCRD

# explicit lam_rel and spatial: these tests are not about the label-free choice (tests/test_selection.py is)
SMALL = dict(backbone="resnet18", weights="random", resize=80, crop=64, batch_size=4, lam_rel=0.01, spatial="global")


def texture(rng: np.random.Generator, size: int = 72) -> np.ndarray:
    """A periodic texture with a random phase and a little noise, uint8 (size, size, 3)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    base = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 9 + p1) + 0.2 * np.sin(2 * np.pi * yy / 9 + p2)
    img = np.stack([base, 0.9 * base, 0.8 * base], -1) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def plant_defect(img: np.ndarray, y: int, x: int) -> np.ndarray:
    out = img.copy()
    out[y : y + 12, x : x + 12] = (15, 80, 15)
    return out


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("textures")
    train = [texture(rng) for _ in range(12)]
    normal = [texture(rng) for _ in range(3)]
    spots = [(20, 40), (40, 16), (30, 30)]
    defective = [plant_defect(texture(rng), y, x) for y, x in spots]
    for folder, imgs in (("train", train), ("normal", normal), ("defective", defective)):
        (root / folder).mkdir()
        for i, img in enumerate(imgs):
            Image.fromarray(img).save(root / folder / f"{i:02d}.png")
    return dict(root=root, train=train, normal=normal, defective=defective, spots=spots)


@pytest.fixture(scope="module")
def fitted(data):
    return CRDDetector(**SMALL).fit(data["root"] / "train", progress=False)


def test_fit_predict_shapes_and_paths(fitted, data):
    res = fitted.predict(data["root"] / "defective", progress=False)
    assert isinstance(res, DetectionResult) and len(res) == 3
    assert res.image_scores.shape == (3,) and res.image_scores.dtype == np.float64
    assert res.anomaly_maps.shape == (3, 64, 64) and res.anomaly_maps.dtype == np.float32
    assert res.patch_maps.shape == (3, 8, 8)
    assert [Path(p).name for p in res.paths] == ["00.png", "01.png", "02.png"]
    np.testing.assert_array_equal(res.image_scores, res.patch_maps.reshape(3, -1).max(axis=1).astype(np.float64))
    assert res.labels is None and res.normalized_scores is None and res.threshold is None
    assert fitted.n_images == 12 and fitted.model.scorer.n_samples == 12 * 64
    assert fitted.dim == 384 and fitted.layer_channels == [128, 256] and fitted.patch_grid == (8, 8)


def test_every_input_kind_gives_the_same_scores(fitted, data):
    root = data["root"] / "normal"
    paths = sorted(str(p) for p in root.iterdir())
    by_folder = fitted.predict(root, progress=False)
    by_list = fitted.predict(paths, progress=False)
    by_tensor = fitted.predict(as_batch(data["normal"]), progress=False)
    by_arrays = fitted.predict(list(data["normal"]), progress=False)
    for res in (by_list, by_tensor, by_arrays):
        np.testing.assert_array_equal(res.image_scores, by_folder.image_scores)
        np.testing.assert_array_equal(res.anomaly_maps, by_folder.anomaly_maps)
    assert by_tensor.paths == [None] * 3


def test_planted_defects_score_higher_and_are_located(fitted, data):
    normal = fitted.predict(as_batch(data["normal"]), progress=False)
    bad = fitted.predict(as_batch(data["defective"]), progress=False)
    assert bad.image_scores.min() > normal.image_scores.max()
    scale, offset = 80 / 72, (80 - 64) / 2  # resize then center crop
    for amap, (y, x) in zip(bad.anomaly_maps, data["spots"]):
        peak = np.unravel_index(int(amap.argmax()), amap.shape)
        centre = ((y + 6) * scale - offset, (x + 6) * scale - offset)
        assert abs(peak[0] - centre[0]) <= 10 and abs(peak[1] - centre[1]) <= 10


def test_patch_maps_equal_scorer_scores_on_embeddings(fitted, data):
    x = next(fitted.iter_batches(as_batch(data["defective"])))[1]
    emb = fitted.embed(x)
    assert emb.shape == (3, 384, 8, 8)
    want = fitted.model.scorer.score(patch_matrix(emb).double()).reshape(3, 8, 8)
    got = fitted.predict(as_batch(data["defective"]), progress=False).patch_maps
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * float(want.max()))


def test_fit_streams_batches_into_partial_fit(data, monkeypatch):
    rows = []
    original = CRDScorer.partial_fit

    def spy(self, X):
        rows.append(X.shape[0])
        return original(self, X)

    monkeypatch.setattr(CRDScorer, "partial_fit", spy)
    det = CRDDetector(**SMALL).fit(data["root"] / "train", progress=False)
    # 12 images in batches of 4: never more than one batch of patches at a time, and all of them in the end.
    assert max(rows) <= 4 * 64 and sum(rows) == 12 * 64
    # What the detector holds does not depend on the number of images: d x d sums and a bounded sample.
    assert len(det.reservoir) <= SCORE_SAMPLE and det.model.scorer.statistics.scatter.shape == (384, 384)


def test_partial_fit_in_halves_equals_fit(fitted, data):
    paths = sorted(str(p) for p in (data["root"] / "train").iterdir())
    det = CRDDetector(**SMALL).partial_fit(paths[:4], progress=False).partial_fit(paths[4:], progress=False)
    a, b = det.model.scorer.statistics, fitted.model.scorer.statistics
    assert a.count == b.count and det.n_images == fitted.n_images
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-13)
    torch.testing.assert_close(a.scatter, b.scatter, rtol=1e-12, atol=1e-10)
    x = as_batch(data["defective"])
    np.testing.assert_allclose(
        det.predict(x, progress=False).image_scores, fitted.predict(x, progress=False).image_scores, rtol=1e-5
    )


def test_train_score_stats(fitted):
    stats = fitted.train_score_stats
    assert stats["n"] == 12 and stats["min"] <= stats["q50"] <= stats["q99"] <= stats["max"]
    assert stats["std"] > 0


def test_thresholds_give_labels_and_normalised_scores(fitted, data):
    det = fitted
    x = as_batch(data["normal"] + data["defective"])
    try:
        t = det.calibrate(as_batch(data["normal"]), q=1.0, progress=False)
        res = det.predict(x, progress=False)
        assert t == pytest.approx(res.image_scores[:3].max()) and res.threshold == t
        np.testing.assert_array_equal(res.labels, res.image_scores >= t)
        assert res.labels[:3].sum() == 1 and res.labels[3:].all()  # q=1: only the highest normal reaches t
        assert np.all((res.normalized_scores >= 0) & (res.normalized_scores <= 1))
        assert np.all(res.normalized_scores[res.labels] >= 0.5) and np.all(res.normalized_scores[~res.labels] < 0.5)
        t2 = det.calibrate_labelled(x, [0, 0, 0, 1, 1, 1], progress=False)
        assert res.image_scores[:3].max() < t2 <= res.image_scores[3:].min()
        det.set_threshold(None)
        assert det.predict(x, progress=False).labels is None
        with pytest.raises(ValueError, match="threshold"):
            det.set_threshold(float("nan"))
    finally:
        det.set_threshold(None)


def test_refit_resets_threshold_and_lam_change_rebuilds_model(data):
    det = CRDDetector(**SMALL).fit(as_batch(data["train"][:6]), progress=False)
    det.set_threshold(1.0)
    x = as_batch(data["defective"])
    before = det.predict(x, progress=False).image_scores
    det.model.scorer.lam_rel = 1.0
    after = det.predict(x, progress=False).image_scores
    assert not np.allclose(before, after)
    assert det.config["lam_rel"] == 1.0
    det.fit(as_batch(data["train"][6:]), progress=False)
    assert det.threshold is None and det.n_images == 6


def test_save_load_round_trip_is_exact(fitted, data, tmp_path):
    fitted.set_threshold(0.5)
    path = tmp_path / "model.crd"
    try:
        fitted.save(path)
    finally:
        fitted.set_threshold(None)
    loaded = CRDDetector.load(path)
    x = as_batch(data["defective"] + data["normal"])
    a, b = fitted.predict(x, progress=False), loaded.predict(x, progress=False)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    np.testing.assert_array_equal(a.anomaly_maps, b.anomaly_maps)
    assert loaded.threshold == 0.5 and b.labels is not None
    assert loaded.config == fitted.config and loaded.n_images == 12
    assert loaded.train_score_stats == fitted.train_score_stats
    from crd_fast.io.model_file import read_model_file

    _, meta = read_model_file(path, "crd_detector")
    assert meta["weights_identity"] == {"kind": "random", "seed": 0}
    assert meta["layers"] == ["layer2", "layer3"] and meta["d"] == 384 and meta["n_patches"] == 12 * 64
    assert meta["crop"] == 64 and meta["embedding"] == "concat" and meta["crd_fast_version"]
    # Run-time options may differ; the model must not.
    assert (
        CRDDetector.load(path, device="cpu", batch_size=2, backbone="resnet18", layers=["layer2", "layer3"]).batch_size
        == 2
    )


@pytest.mark.parametrize(
    "expected, match",
    [
        (dict(backbone="resnet34"), "backbone='resnet18'"),
        (dict(layers=("layer1", "layer2")), "layers="),
        (dict(embedding="patchcore"), "embedding='concat'"),
        (dict(crop=56), "crop=64"),
        (dict(weights="imagenet"), "weights"),
        (dict(seed=3), "seed=0"),
    ],
)
def test_load_refuses_another_configuration(fitted, tmp_path, expected, match):
    path = tmp_path / "model.crd"
    fitted.save(path)
    with pytest.raises(ModelFileError, match=match):
        CRDDetector.load(path, **expected)


def test_load_refuses_corrupt_files(fitted, tmp_path):
    path = tmp_path / "model.crd"
    fitted.save(path)
    blob = path.read_bytes()
    truncated = tmp_path / "truncated.crd"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError, match="truncated.crd"):
        CRDDetector.load(truncated)
    garbage = tmp_path / "garbage.crd"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="garbage.crd"):
        CRDDetector.load(garbage)
    flipped = tmp_path / "flipped.crd"
    flipped.write_bytes(blob[:-8] + bytes(b ^ 0xFF for b in blob[-8:]))
    with pytest.raises(ModelFileError, match="flipped.crd"):
        CRDDetector.load(flipped)
    scorer_only = tmp_path / "scorer.crd"
    fitted.model.scorer.save(scorer_only)
    with pytest.raises(ModelFileError, match="expected 'crd_detector'"):
        CRDDetector.load(scorer_only)
    with pytest.raises(TypeError, match="unknown detector option"):
        CRDDetector.load(path, colour="red")


def test_weights_file_detector_round_trip(data, tmp_path):
    from crd_fast.features import build_backbone

    weights = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18", "random", seed=7).state_dict(), weights)
    options = dict(SMALL, weights=str(weights))
    det = CRDDetector(**options).fit(as_batch(data["train"][:4]), progress=False)
    seeded = CRDDetector(**dict(SMALL, seed=7)).fit(as_batch(data["train"][:4]), progress=False)
    x = as_batch(data["defective"])
    np.testing.assert_array_equal(
        det.predict(x, progress=False).image_scores, seeded.predict(x, progress=False).image_scores
    )
    path = tmp_path / "m.crd"
    det.save(path)
    moved = tmp_path / "moved.pth"
    weights.rename(moved)
    loaded = CRDDetector.load(path, weights=str(moved))  # same SHA-256 at a new path
    np.testing.assert_array_equal(
        loaded.predict(x, progress=False).image_scores, det.predict(x, progress=False).image_scores
    )
    with pytest.raises(BackboneWeightsError, match=r"r18.pth.*weights=<its new path>"):
        CRDDetector.load(path)
    torch.save(build_backbone("resnet18", "random", seed=8).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ModelFileError, match="weights"):
        CRDDetector.load(path, weights=str(tmp_path / "other.pth"))
    assert "sha256" in det.weights_description and "RANDOM" in seeded.weights_description


def test_bad_inputs(fitted, data, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("nope")
    with pytest.raises(ImageReadError, match="broken.png"):
        fitted.predict([str(broken)], progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fitted.predict(torch.rand(2, 3, 64, 64) * 255, progress=False)
    with pytest.raises(ValueError, match=r"image 1: .*\[0, 1\]"):
        fitted.predict([data["normal"][0], np.full((64, 64, 3), 3.0)], progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        CRDDetector(**SMALL).predict(as_batch(data["normal"]), progress=False)
    with pytest.raises(ValueError, match="no images"):
        CRDDetector(**SMALL).fit([], progress=False)
    with pytest.raises(ValueError, match="embedding"):
        CRDDetector(**dict(SMALL, embedding="sum"))
    with pytest.raises(ValueError, match="batch_size"):
        CRDDetector(**dict(SMALL, batch_size=0))
    with pytest.raises(ValueError, match="device"):
        CRDDetector(**dict(SMALL, device="tpu:9"))
    with pytest.raises(ValueError, match="lam_rel"):
        CRDDetector(**dict(SMALL, lam_rel=-1.0))


def test_progress_bars(fitted, data, capsys):
    fitted.predict(as_batch(data["normal"]), progress=False)
    assert "predict" not in capsys.readouterr().err
    fitted.predict(as_batch(data["normal"]), progress=True)
    assert "predict" in capsys.readouterr().err


def test_patchcore_embedding_end_to_end(data):
    det = CRDDetector(**dict(SMALL, embedding="patchcore", target_dim=96)).fit(as_batch(data["train"]), progress=False)
    assert det.dim == 96
    normal = det.predict(as_batch(data["normal"]), progress=False)
    bad = det.predict(as_batch(data["defective"]), progress=False)
    assert bad.image_scores.min() > normal.image_scores.max()


# ---- options (DetectorConfig) -------------------------------------------------------------------------
def test_detector_options_are_the_config_fields(fitted):
    assert tuple(fitted.config) == OPTIONS  # the stored config: every option, in field order
    assert fitted.options == DetectorConfig(**SMALL) and fitted.config == DetectorConfig(**SMALL).to_dict()
    # positional options follow the same order as before (backbone, weights, layers, ...)
    positional = CRDDetector("resnet18", "random", ("layer2",), resize=80, crop=64)
    defaults = dict(layers=["layer2"], batch_size=8, lam_rel="auto", spatial="auto")
    assert positional.config == dict(DetectorConfig(**SMALL).to_dict(), **defaults)
    rebuilt = CRDDetector.from_config(fitted.options)
    assert rebuilt.config == fitted.config and not rebuilt.is_fitted
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        CRDDetector(colour="red")
    with pytest.raises(TypeError, match="DetectorConfig"):
        CRDDetector.from_config(SMALL)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(embedding="sum"), r"embedding must be one of \('concat', 'patchcore'\), got 'sum'"),
        (dict(batch_size=0), r"batch_size must be an integer in \[1, 65536\], got 0"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63 - 1\], got -1"),
        (dict(target_dim=2.5), r"target_dim must be an integer in \[1, 65536\], got 2.5"),
        (dict(lam_rel=float("nan")), "lam_rel must be a positive finite number or 'auto', got nan"),
        (dict(lam_rel="Auto"), "lam_rel must be a positive finite number or 'auto', got 'Auto'"),
        (dict(spatial="position"), r"spatial must be one of \('global', 'local'.*'auto'\), got 'position'"),
        (dict(local_rank=0), r"local_rank must be an integer in \[1, 65536\], got 0"),
        (dict(local_shrinkage=1.5), r"local_shrinkage must be a number in \[0, 1\], got 1.5"),
        (dict(rank=0), r"rank must be an integer in \[1, 65536\] or None, got 0"),
        (dict(crop="64"), r"crop must be an integer in \[1, 4096\], got '64'"),
        (dict(blur_sigma=-1.0), r"blur_sigma must be a finite number >= 0, got -1.0"),
        (dict(weights=3), "weights must be 'imagenet', 'random' or a path to a state-dict file, got 3"),
    ],
)
def test_bad_options_are_named_without_torch(change, match):
    with pytest.raises(ValueError, match=match):
        DetectorConfig(**dict(SMALL, **change))


def test_config_normalises_what_means_the_same(tmp_path):
    config = DetectorConfig(
        backbone="resnet18", weights=tmp_path / "w.pth", layers="layer2", device=torch.device("cpu")
    )
    assert config.weights == str(tmp_path / "w.pth") and config.layers == ("layer2",) and config.device == "cpu"
    assert config.replace(batch_size=2).batch_size == 2 and config.batch_size == 8
    with pytest.raises(ValueError, match="batch_size"):
        config.replace(batch_size=0)
    module_config = DetectorConfig(backbone=torch.nn.Identity(), weights="imagenet")
    assert module_config.weights is None and module_config.to_dict()["backbone"] == "custom:Identity"


def test_load_compares_options_by_their_validated_value(fitted, tmp_path):
    path = tmp_path / "model.crd"
    fitted.save(path)
    assert CRDDetector.load(path, layers=("layer2", "layer3"), lam_rel=fitted.model.scorer.lam_rel).is_fitted
    with pytest.raises(ModelFileError, match="layers="):
        CRDDetector.load(path, layers="layer2")
    with pytest.raises(ValueError, match="crop must be an integer in"):
        CRDDetector.load(path, crop=-64)


# ---- fitting state: reset, install_fit, the training-score sample ---------------------------------------
def test_reset_forgets_the_fit_but_keeps_options_and_threshold(data):
    det = CRDDetector(**SMALL).fit(as_batch(data["train"][:3]), progress=False)
    det.set_threshold(0.7)
    det.model.scorer.lam_rel = 0.2
    det.reset()
    assert not det.is_fitted and det.n_images == 0 and len(det.reservoir) == 0
    assert det.threshold == 0.7 and det.config["lam_rel"] == 0.2 and det.train_score_stats is None


def test_install_fit_takes_over_a_fit_made_elsewhere(fitted, data):
    det = CRDDetector(**SMALL)
    model = GlobalCRD(CRDScorer.from_statistics(fitted.model.scorer.statistics))
    det.install_fit(model, fitted.n_images, fitted.reservoir.copy())
    x = as_batch(data["defective"])
    np.testing.assert_array_equal(
        det.predict(x, progress=False).image_scores, fitted.predict(x, progress=False).image_scores
    )
    assert det.train_score_stats == fitted.train_score_stats and det.n_images == 12
    with pytest.raises(ValueError, match="d=384"):
        det.install_fit(GlobalCRD(CRDScorer().fit(torch.randn(10, 5))), 1, det.reservoir)
    with pytest.raises(ValueError, match=f"up to {SCORE_SAMPLE} inputs"):
        det.install_fit(fitted.model, 1, Reservoir(3))
    with pytest.raises(ValueError, match="a 'local' model"):
        det.install_fit(LocalCRD.create(dict(lam_rel=0.01, local_rank=2, local_shrinkage=0.5)), 1, det.reservoir)


def _algorithm_r(stream: list, capacity: int, seed: int) -> list:
    """Reservoir sampling written out item by item (Vitter's Algorithm R), the reference."""
    import random

    rng, sample = random.Random(seed), []
    for seen, item in enumerate(stream, start=1):
        if len(sample) < capacity:
            sample.append(item)
        else:
            j = rng.randrange(seen)
            if j < capacity:
                sample[j] = item
    return sample


@pytest.mark.parametrize("capacity, n, seed", [(5, 3, 0), (5, 5, 1), (4, 60, 2), (32, 500, 7)])
def test_reservoir_equals_algorithm_r_whatever_the_chunking(rng, capacity, n, seed):
    stream = list(range(n))
    reservoir: Reservoir[int] = Reservoir(capacity, seed)
    start = 0
    while start < n:  # random chunk sizes, empty ones included
        stop = min(n, start + int(rng.integers(0, 9)))
        reservoir.extend(stream[start:stop])
        start = stop
    assert reservoir.items == _algorithm_r(stream, capacity, seed)
    assert reservoir.seen == n and len(reservoir) == min(n, capacity)


def test_reservoir_fetches_only_kept_items_and_fails_cleanly():
    stream = [f"img{i}" for i in range(40)]
    calls = []

    def fetch(offset):
        def get(positions):
            calls.append(positions)
            return {p: stream[offset + p] for p in positions}

        return get

    lazy: Reservoir[str] = Reservoir(6, 3)
    lazy.extend_lazily(20, fetch(0))
    twin = lazy.copy()

    def broken(positions):
        raise OSError("unreadable")

    with pytest.raises(OSError, match="unreadable"):
        lazy.extend_lazily(20, broken)
    lazy.extend_lazily(20, fetch(20))  # the failed call left no trace
    assert lazy.items == _algorithm_r(stream, 6, 3) and lazy.seen == 40
    assert all(len(c) <= 6 and c == sorted(set(c)) for c in calls)
    assert len(calls) == 2 and len(calls[0]) == 6  # an empty reservoir keeps 6 of the first 20
    assert twin.seen == 20 and twin.items == _algorithm_r(stream[:20], 6, 3)  # the copy did not move
    with pytest.raises(ValueError, match="capacity"):
        Reservoir(0)
