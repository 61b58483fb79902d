"""Distributed fitting, sharded prediction and online updates (crd_fast.distributed).

The multi-process tests start a real two-rank gloo job on localhost with torchrun
(``python -m torch.distributed.run``), running this very file as the worker script (see ``_worker``
at the bottom), bounded in time: the whole process group is killed on overrun. Each scenario writes
its results to a folder; the test compares them with a single-process computation on the same data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torchrun_command

from crd_fast import CRDScorer
from crd_fast.core.stats import PatchStatistics
from crd_fast.distributed import (
    DistributedError,
    all_reduce_bytes,
    all_reduce_statistics,
    fit_distributed,
    init_distributed,
    merge_records,
    predict_sharded,
    run_fit,
    run_predict,
    shard,
    shard_indices,
)

D = 12  # feature dimension of the scorer-level data
WORLD = 2
JOB_TIMEOUT_S = 75.0


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---- data shared by the workers and the checks ---------------------------------------------------
def patch_items(seed: int, sizes: list[int], d: int = D, offset: float = 3.0) -> list[np.ndarray]:
    """Correlated Gaussian patch arrays, one (n_i, d) array per 'image'; the same on every rank."""
    g = np.random.default_rng(seed)
    mixing = g.standard_normal((d, d)) / np.sqrt(1.0 + np.arange(d))[None, :]
    return [g.standard_normal((n, d)) @ mixing.T + offset for n in sizes]


FIT_SIZES = [30, 41, 7, 25, 60, 3, 18]  # 7 items: rank 0 gets 4, rank 1 gets 3
UPDATE_SIZES = [22, 9, 35]
PREDICT_SIZES = [11, 4, 9, 16, 5]  # odd count: the ranks get different numbers of items

# Detector level: resnet18 with seeded random weights on tiny images (layer2+layer3: d = 384, 4x4 patches).
# explicit lam_rel and spatial: the label-free choice ("auto") is single-process (tests/test_selection.py)
DETECTOR_OPTIONS = dict(
    backbone="resnet18", weights="random", resize=36, crop=32, batch_size=8, lam_rel=0.01, spatial="global"
)
LOCAL_OPTIONS = dict(DETECTOR_OPTIONS, spatial="local", local_rank=4)
N_TRAIN_IMAGES = 37  # odd, and more than the detector's training-score sample (32): the reservoir replaces some
N_TEST_IMAGES = 5
THRESHOLD = 0.075  # inside the range of the random-weight training scores, so both labels occur


def tiny_images(seed: int, n: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [(g.random((40, 44, 3)) * 255).astype(np.uint8) for _ in range(n)]


def write_images(folder: Path, images: list[np.ndarray]) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"img_{i:03d}.png") for i in range(len(images))]
    for path, img in zip(paths, images):
        Image.fromarray(img).save(path)
    return paths


def make_detector(**options):
    from crd_fast.detector.detector import CRDDetector

    return CRDDetector(**{**DETECTOR_OPTIONS, **options})


def single_process_scorer(items: list[np.ndarray], **params) -> CRDScorer:
    return CRDScorer(**params).fit(np.vstack(items))


def assert_same_model(a: CRDScorer, b: CRDScorer, rtol: float = 1e-11) -> None:
    sa, sb = a.statistics, b.statistics
    assert sa.count == sb.count
    torch.testing.assert_close(sa.mean, sb.mean, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(sa.scatter, sb.scatter, rtol=rtol, atol=1e-9)
    torch.testing.assert_close(a.projection.matrix, b.projection.matrix, rtol=1e-9, atol=1e-11)
    assert a.lam == pytest.approx(b.lam, rel=1e-11)


# ---- sharding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["strided", "contiguous"])
def test_shards_cover_every_item_exactly_once(mode):
    for n in range(0, 12):
        for world in range(1, 5):
            shards = [shard_indices(n, r, world, mode) for r in range(world)]
            flat = sorted(i for s in shards for i in s)
            assert flat == list(range(n)), (n, world, shards)
            assert all(s == sorted(s) for s in shards)
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1
            if mode == "strided":
                assert shards == [list(range(n))[r::world] for r in range(world)]
            else:
                assert all(s == list(range(s[0], s[0] + len(s))) for s in shards if s)


def test_shard_returns_items_with_their_indices():
    items = list("abcdefg")
    assert shard(items, 1, 3) == ([1, 4], ["b", "e"])
    assert shard(items, 2, 3, "contiguous") == ([5, 6], ["f", "g"])
    assert shard(items[:1], 1, 2) == ([], [])


@pytest.mark.parametrize(
    "args, match",
    [((5, 2, 2), "rank must be"), ((5, -1, 2), "rank must be"), ((5, 0, 0), "world_size"), ((-1, 0, 1), "n_items")],
)
def test_bad_shard_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        shard_indices(*args)


def test_unknown_shard_mode_is_refused():
    with pytest.raises(ValueError, match="shard mode must be one of"):
        shard_indices(4, 0, 2, mode="random")


def test_all_reduce_payload_is_d_squared_float64_whatever_the_data():
    b = all_reduce_bytes(1536, 2)
    assert b["scatter"] == 8 * 1536 * 1536 and b["mean_sum"] == 8 * 1536
    assert b["payload"] == 8 * (1536 * 1536 + 1536 + 3)
    assert all_reduce_bytes(16, 4)["ring_sent"] == (2 * 3 * 8 * (16 * 16 + 16)) // 4 + 24 * 3
    with pytest.raises(ValueError, match="dim and world_size must be positive"):
        all_reduce_bytes(0)


# ---- single process (no process group): the same entry points, world size 1 ------------------------
def test_fit_without_process_group_equals_plain_fit():
    items = patch_items(1, FIT_SIZES)
    model = fit_distributed(CRDScorer(lam_rel=0.02), items)
    assert_same_model(model, single_process_scorer(items, lam_rel=0.02))


def test_all_reduce_statistics_without_group_copies_and_refuses_nothing():
    stats = PatchStatistics(D).update(torch.from_numpy(patch_items(2, [20])[0]))
    out = all_reduce_statistics(stats)
    assert out is not stats and out.count == 20 and torch.equal(out.scatter, stats.scatter)
    with pytest.raises(ValueError, match="no patches on any"):
        all_reduce_statistics(None)


def test_online_update_of_a_saved_scorer_equals_fit_on_everything(tmp_path):
    old, new = patch_items(3, FIT_SIZES), patch_items(4, UPDATE_SIZES)
    fit_distributed(CRDScorer(lam_rel=0.05, rank=8), old, save_path=tmp_path / "m.crd")
    everything = single_process_scorer(old + new, lam_rel=0.05, rank=8)
    # plain CRDScorer API: load, partial_fit, no old images needed
    updated = CRDScorer.load(tmp_path / "m.crd")
    for x in new:
        updated.partial_fit(x)
    assert_same_model(updated, everything)
    # the distributed entry point with update=True does the same
    again = fit_distributed(CRDScorer.load(tmp_path / "m.crd"), new, update=True, save_path=tmp_path / "m2.crd")
    assert_same_model(again, everything)
    assert_same_model(CRDScorer.load(tmp_path / "m2.crd"), everything)
    probe = np.vstack(patch_items(5, [50]))
    np.testing.assert_allclose(again.score(probe), everything.score(probe), rtol=1e-9)


def test_update_with_other_feature_dimension_is_refused(tmp_path):
    model = fit_distributed(CRDScorer(), patch_items(6, [20, 20]))
    with pytest.raises(ValueError, match=f"expected {D}|d={D}"):
        fit_distributed(model, patch_items(7, [20], d=D + 1), update=True)


def test_failed_fit_keeps_the_old_model_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.crd"
    fit_distributed(CRDScorer(), patch_items(8, [40, 40]), save_path=path)
    before = path.read_bytes()
    items = patch_items(9, [30, 30, 30])
    items[2][5, 3] = np.nan
    with pytest.raises(ValueError, match=r"items\[2\] contains non-finite"):
        fit_distributed(CRDScorer(), items, save_path=path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.crd"]


def test_fit_refuses_bad_inputs():
    with pytest.raises(TypeError, match="items must be a list, tuple or data set"):
        fit_distributed(CRDScorer(), iter(patch_items(1, [5])))
    with pytest.raises(TypeError, match="model must be a CRDScorer or CRDDetector"):
        fit_distributed(object(), patch_items(1, [5]))
    with pytest.raises(ValueError, match="at least 2 training patches"):
        fit_distributed(CRDScorer(), patch_items(1, [1]))


def test_predict_without_group_matches_scoring_in_order(tmp_path):
    model = single_process_scorer(patch_items(10, FIT_SIZES))
    items = patch_items(11, PREDICT_SIZES)
    records = predict_sharded(model, items, output=tmp_path / "s.json")
    assert [r["index"] for r in records] == list(range(len(items)))
    expected = [float(np.max(model.score(x))) for x in items]
    assert [r["image_score"] for r in records] == expected
    assert json.loads((tmp_path / "s.json").read_text()) == records
    with pytest.raises(ValueError, match=r"must end in \.csv or \.json"):
        predict_sharded(model, items, output=tmp_path / "s.txt")


def test_predict_with_a_scoring_function_and_callback():
    seen = []
    records = predict_sharded(
        lambda xs: [len(x) for x in xs], ["ab", "c", "def"], on_result=lambda i, r: seen.append((i, r))
    )
    assert [(r["index"], r["image_score"], r["path"]) for r in records] == [
        (0, 2.0, "ab"),
        (1, 1.0, "c"),
        (2, 3.0, "def"),
    ]
    assert seen == [([0, 1, 2], [2, 1, 3])]
    with pytest.raises(DistributedError, match="returned 1 results for 3 items"):
        predict_sharded(lambda xs: [0.0], ["a", "b", "c"])


def test_cli_entry_points_run_single_process_without_torchrun(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    items = patch_items(12, FIT_SIZES)
    envs = []
    model = run_fit(lambda env: envs.append(env) or CRDScorer(lam_rel=0.02), items, tmp_path / "m.crd", progress=False)
    assert (envs[0].rank, envs[0].world_size, envs[0].backend) == (0, 1, None)
    assert_same_model(CRDScorer.load(tmp_path / "m.crd"), single_process_scorer(items, lam_rel=0.02))
    records = run_predict(lambda env: CRDScorer.load(tmp_path / "m.crd"), items[:3], tmp_path / "p.csv", progress=False)
    assert [r["image_score"] for r in records] == [float(np.max(model.score(x))) for x in items[:3]]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "env, backend, match",
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "gloo", "MASTER_ADDR is not set"),
        (
            {"RANK": "zero", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "gloo",
            "RANK='zero' is not an integer",
        ),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "nccl", "needs CUDA GPUs"),
    ],
)
def test_bad_torchrun_environment_is_named(monkeypatch, env, backend, match):
    if backend == "nccl" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nccl would start")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=match):
        init_distributed(backend)


def test_merge_records_refuses_lost_or_duplicated_items():
    a, b = [{"index": 0}, {"index": 2}], [{"index": 1}]
    assert [r["index"] for r in merge_records([a, b], 3)] == [0, 1, 2]
    with pytest.raises(DistributedError, match="1 missing"):
        merge_records([a], 3)
    with pytest.raises(DistributedError, match="1 duplicated"):
        merge_records([a, b, [{"index": 1}]], 3)


def assert_same_features_model(a: CRDScorer, b: CRDScorer) -> None:
    """Same model up to float32 feature noise: the backbone runs in float32 and its results move in
    the last bits with the batch an image shares, which differs between shardings."""
    sa, sb = a.statistics, b.statistics
    assert sa.count == sb.count
    scale = float(sb.scatter.abs().max())
    torch.testing.assert_close(sa.mean, sb.mean, rtol=1e-5, atol=1e-6 * float(sb.mean.abs().max()))
    torch.testing.assert_close(sa.scatter, sb.scatter, rtol=1e-5, atol=1e-6 * scale)
    assert a.lam == pytest.approx(b.lam, rel=1e-5)


def pooled_scorer(detector):
    """The global CRD of a detector's training patches: its model's own, or derived from the local model's."""
    return detector.model.derive("global").scorer if detector.spatial_choice == "local" else detector.model.scorer


def assert_same_detector(a, b) -> None:
    assert a.n_images == b.n_images
    assert_same_features_model(pooled_scorer(a), pooled_scorer(b))
    sa, sb = a.train_score_stats, b.train_score_stats
    assert sa.keys() == sb.keys() and sa["n"] == sb["n"]
    for key in sa:
        assert sa[key] == pytest.approx(sb[key], rel=1e-4), key


def test_detector_fit_without_group_equals_detector_fit():
    images = tiny_images(40, N_TRAIN_IMAGES)
    assert_same_detector(fit_distributed(make_detector(), images), make_detector().fit(images, progress=False))


def assert_same_local_detector(a, b) -> None:
    assert a.spatial_choice == b.spatial_choice == "local" and a.n_images == b.n_images
    la, lb = a.model.scorer, b.model.scorer
    assert la.n_images == lb.n_images and (la.lam_rel, la.shrinkage, la.rank) == (lb.lam_rel, lb.shrinkage, lb.rank)
    # fewer images than the sketch size: the sketches are exact, so any sharding gives the same model
    ma, mb = la.model(), lb.model()
    torch.testing.assert_close(ma.means, mb.means, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ma.eigenvalues, mb.eigenvalues, rtol=1e-7, atol=1e-9)
    assert_same_features_model(pooled_scorer(a), pooled_scorer(b))
    sa, sb = a.train_score_stats, b.train_score_stats
    for key in sa:
        assert sa[key] == pytest.approx(sb[key], rel=1e-4), key


def test_local_detector_fit_without_group_equals_detector_fit():
    images = tiny_images(40, N_TRAIN_IMAGES)
    expected = make_detector(**LOCAL_OPTIONS).fit(images, progress=False)
    assert_same_local_detector(fit_distributed(make_detector(**LOCAL_OPTIONS), images), expected)


def test_distributed_fit_of_few_images_settles_the_auto_options_as_a_fit_does():
    images = tiny_images(44, 9)
    auto = dict(DETECTOR_OPTIONS, lam_rel="auto", spatial="auto")
    expected = make_detector(**auto).fit(images, progress=False)
    got = fit_distributed(make_detector(**auto), images)
    assert got.selection.reason() == expected.selection.reason() and got.lam_rel == expected.lam_rel == 0.01
    assert_same_detector(got, expected)
    with pytest.raises(ValueError, match="the label-free choice"):
        fit_distributed(make_detector(**auto), tiny_images(45, 20))


def test_detector_online_update_equals_fit_on_everything(tmp_path):
    old, new = tiny_images(41, 9), tiny_images(42, 7)
    make_detector().fit(old, progress=False).save(tmp_path / "det.crd")
    from crd_fast.detector.detector import CRDDetector

    everything = make_detector().fit(old + new, progress=False)
    updated = CRDDetector.load(tmp_path / "det.crd").partial_fit(new, progress=False)
    assert updated.n_images == everything.n_images == 16
    assert_same_features_model(updated.model.scorer, everything.model.scorer)
    # the distributed entry point with update=True gives what partial_fit gives, sample included
    again = fit_distributed(CRDDetector.load(tmp_path / "det.crd"), new, update=True)
    assert_same_detector(again, updated)
    probe = tiny_images(43, 3)
    np.testing.assert_allclose(
        again.predict(probe, progress=False).image_scores,
        everything.predict(probe, progress=False).image_scores,
        rtol=1e-4,
    )


def test_scorer_from_statistics_equals_a_fit_and_replace_statistics_refits():
    bank = torch.randn(300, 12, dtype=torch.float64)
    stats = PatchStatistics(12).update(bank)
    fitted = CRDScorer(lam_rel=0.05, rank=6).fit(bank)
    rebuilt = CRDScorer.from_statistics(stats, lam_rel=0.05, rank=6)
    assert rebuilt.statistics is stats and (rebuilt.lam_rel, rebuilt.center, rebuilt.rank) == (0.05, True, 6)
    torch.testing.assert_close(rebuilt.score(bank), fitted.score(bank), rtol=0, atol=0)
    other = PatchStatistics(12).update(2 * bank + 1)
    before = rebuilt.score(bank)
    rebuilt.replace_statistics(other)  # the cached projection must not survive the swap
    refitted = CRDScorer(0.05, rank=6).fit(2 * bank + 1)
    torch.testing.assert_close(rebuilt.score(bank), refitted.score(bank), rtol=0, atol=0)
    assert not torch.equal(rebuilt.score(bank), before)
    with pytest.raises(TypeError, match="PatchStatistics"):
        rebuilt.replace_statistics(bank)


# ---- two real processes (torchrun, gloo, localhost) ---------------------------------------------------
def run_two_ranks(scenario: str, out: Path, timeout: float = JOB_TIMEOUT_S) -> int:
    """Run ``scenario`` on two gloo ranks under torchrun; kill the whole job on overrun. Returns its exit code."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        *torchrun_command(WORLD),
        "--monitor-interval",
        "0.2",
        os.path.abspath(__file__),
        "worker",
        scenario,
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = out / "torchrun.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(
                f"two-rank job '{scenario}' overran {timeout} s and was killed; log:\n{log.read_text()[-4000:]}"
            )


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> Path:
    """One two-rank job running every scenario that must succeed (starting torchrun costs seconds)."""
    out = tmp_path_factory.mktemp("dist_main")
    write_images(out / "train", tiny_images(50, N_TRAIN_IMAGES))
    write_images(out / "test", tiny_images(51, N_TEST_IMAGES))
    (out / "raise").mkdir()
    CRDScorer().fit(np.vstack(patch_items(30, [40]))).save(out / "raise" / "model.crd")  # the "old" model
    rc = run_two_ranks("main", out)
    assert rc == 0, (out / "torchrun.log").read_text()[-6000:]
    return out


@pytest.mark.slow
def test_two_rank_fit_equals_single_process_fit(main_job):
    expected = single_process_scorer(patch_items(20, FIT_SIZES), lam_rel=0.03, rank=9)
    written = CRDScorer.load(main_job / "fit.crd")
    assert (written.lam_rel, written.rank) == (0.03, 9)
    assert_same_model(written, expected)
    assert_same_model(CRDScorer.load(main_job / "run_fit.crd"), expected)
    # every rank ended with the same model, bit for bit
    per_rank = [CRDScorer.load(main_job / f"fit.rank{r}.crd") for r in range(WORLD)]
    for other in per_rank:
        assert torch.equal(other.statistics.scatter, per_rank[0].statistics.scatter)
        assert torch.equal(other.projection.matrix, written.projection.matrix)
    assert sorted(p.name for p in main_job.glob(".*")) == [], "temporary files left behind"


@pytest.mark.slow
def test_two_rank_fit_in_contiguous_blocks_gives_the_same_model(main_job):
    assert_same_model(
        CRDScorer.load(main_job / "fit_contiguous.crd"), single_process_scorer(patch_items(20, FIT_SIZES))
    )


def test_rank_with_an_empty_shard_still_works(main_job):
    # one item for two ranks: rank 1's shard is empty
    assert_same_model(CRDScorer.load(main_job / "single_item.crd"), single_process_scorer(patch_items(21, [50])))


@pytest.mark.slow
def test_two_rank_online_update_equals_fit_on_everything(main_job):
    expected = single_process_scorer(patch_items(20, FIT_SIZES) + patch_items(22, UPDATE_SIZES), lam_rel=0.03, rank=9)
    assert_same_model(CRDScorer.load(main_job / "updated.crd"), expected)


@pytest.mark.slow
def test_two_rank_prediction_equals_single_process_in_input_order(main_job):
    model = CRDScorer.load(main_job / "fit.crd")
    items = patch_items(23, PREDICT_SIZES)
    expected = predict_sharded(model, items)
    from_json = json.loads((main_job / "predict.json").read_text())
    assert from_json == expected  # same scores, same order, nothing lost or duplicated
    lines = (main_job / "predict.csv").read_text().splitlines()
    assert lines[0] == "index,path,image_score,n_patches"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(len(items)))
    assert [float(line.split(",")[2]) for line in lines[1:]] == [r["image_score"] for r in expected]
    # every rank returned the full ordered list
    for r in range(WORLD):
        assert json.loads((main_job / f"predict.rank{r}.json").read_text()) == expected


@pytest.mark.slow
def test_two_rank_detector_fit_equals_single_process_fit(main_job):
    from crd_fast.detector.detector import CRDDetector

    expected = make_detector().fit(str(main_job / "train"), progress=False)
    written = CRDDetector.load(main_job / "detector.crd")
    assert_same_detector(written, expected)
    assert written.train_score_stats == CRDDetector.load(main_job / "detector.rank1.crd").train_score_stats


@pytest.mark.slow
def test_two_rank_local_detector_fit_equals_single_process_fit(main_job):
    from crd_fast.detector.detector import CRDDetector

    expected = make_detector(**LOCAL_OPTIONS).fit(str(main_job / "train"), progress=False)
    written = CRDDetector.load(main_job / "local.crd")
    assert_same_local_detector(written, expected)
    other = CRDDetector.load(main_job / "local.rank1.crd")
    probe = tiny_images(52, 3)
    np.testing.assert_array_equal(
        written.predict(probe, progress=False).patch_maps, other.predict(probe, progress=False).patch_maps
    )


@pytest.mark.slow
def test_two_rank_detector_prediction_equals_single_process(main_job):
    from crd_fast.detector.detector import CRDDetector

    model = CRDDetector.load(main_job / "detector.crd")
    model.set_threshold(THRESHOLD)
    expected = model.predict(str(main_job / "test"), progress=False)
    lines = (main_job / "detector_scores.csv").read_text().splitlines()
    assert lines[0] == "index,path,image_score,normalized_score,label"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(N_TEST_IMAGES))
    assert [r[1] for r in rows] == expected.paths
    np.testing.assert_allclose([float(r[2]) for r in rows], expected.image_scores, rtol=1e-6)
    np.testing.assert_allclose([float(r[3]) for r in rows], expected.normalized_scores, rtol=1e-6)
    assert [r[4] == "True" for r in rows] == list(expected.labels)
    # the anomaly maps, saved by each rank's on_result callback, match too
    for i in range(N_TEST_IMAGES):
        np.testing.assert_allclose(
            np.load(main_job / "maps" / f"{i}.npy"), expected.anomaly_maps[i], rtol=1e-5, atol=1e-6
        )


@pytest.mark.slow
def test_exception_on_one_rank_stops_every_rank_and_keeps_the_old_file(main_job, tmp_path):
    folder = main_job / "raise"
    errors = [json.loads((folder / f"error.rank{r}.json").read_text()) for r in range(WORLD)]
    assert errors[1]["type"] == "ValueError" and "items[1] contains non-finite" in errors[1]["message"]
    assert errors[0]["type"] == "DistributedError" and "rank(s) [1] of 2 failed" in errors[0]["message"]
    CRDScorer().fit(np.vstack(patch_items(30, [40]))).save(tmp_path / "old.crd")  # saving is deterministic
    assert (folder / "model.crd").read_bytes() == (tmp_path / "old.crd").read_bytes()  # untouched
    assert sorted(p.name for p in folder.iterdir()) == ["error.rank0.json", "error.rank1.json", "model.crd"]


@pytest.mark.slow
def test_killed_rank_leaves_no_model_file(tmp_path):
    rc = run_two_ranks("kill", tmp_path)
    assert rc != 0
    assert (tmp_path / "rank0.reached_combine").exists(), (tmp_path / "torchrun.log").read_text()[-6000:]
    assert not (tmp_path / "model.crd").exists()
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


# ---- the worker: runs on every rank under torchrun -----------------------------------------------------
def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def _scenario_main(out: Path, rank: int) -> None:
    items = patch_items(20, FIT_SIZES)
    model = fit_distributed(CRDScorer(lam_rel=0.03, rank=9), items, save_path=out / "fit.crd")
    model.save(out / f"fit.rank{rank}.crd")  # each rank's own model, to compare across ranks
    fit_distributed(CRDScorer(), items, save_path=out / "fit_contiguous.crd", shard_mode="contiguous")
    fit_distributed(CRDScorer(), patch_items(21, [50]), save_path=out / "single_item.crd")
    run_fit(lambda env: CRDScorer(lam_rel=0.03, rank=9), items, out / "run_fit.crd", progress=False)  # the CLI's call
    loaded = CRDScorer.load(out / "fit.crd")
    fit_distributed(loaded, patch_items(22, UPDATE_SIZES), update=True, save_path=out / "updated.crd")
    predict_items = patch_items(23, PREDICT_SIZES)
    records = predict_sharded(model, predict_items, output=out / "predict.json")
    predict_sharded(model, predict_items, output=out / "predict.csv")
    _dump(out / f"predict.rank{rank}.json", records)

    local = fit_distributed(make_detector(**LOCAL_OPTIONS), str(out / "train"), save_path=out / "local.crd")
    local.save(out / f"local.rank{rank}.crd")
    detector = fit_distributed(make_detector(), str(out / "train"), save_path=out / "detector.crd")
    detector.save(out / f"detector.rank{rank}.crd")
    detector.set_threshold(THRESHOLD)
    (out / "maps").mkdir(exist_ok=True)

    def save_maps(indices, result):
        for i, amap in zip(indices, result.anomaly_maps):
            np.save(out / "maps" / f"{i}.npy", amap)

    predict_sharded(detector, str(out / "test"), output=out / "detector_scores.csv", on_result=save_maps)
    _scenario_raise(out / "raise", rank)  # last: a failure must not hang or write, and is reported everywhere


def _scenario_raise(out: Path, rank: int) -> None:
    items = patch_items(31, [30, 30, 30, 30])
    items[1][3, 2] = np.inf  # item 1 belongs to rank 1 (strided)
    try:
        fit_distributed(CRDScorer(), items, save_path=out / "model.crd")
    except Exception as exc:
        _dump(out / f"error.rank{rank}.json", {"type": type(exc).__name__, "message": str(exc)})
    else:
        raise AssertionError("the fit should have failed on every rank")


class _KillDuringIteration(list):
    """A list of items whose iteration kills rank 1 hard partway through its shard (no Python cleanup)."""

    def __init__(self, items, out: Path, rank: int):
        super().__init__(items)
        self.out, self.rank = out, rank

    def __getitem__(self, i):
        if self.rank == 1 and i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def _scenario_kill(out: Path, rank: int) -> None:
    import crd_fast.distributed.steps as steps_module

    real = steps_module._combine

    def combine_and_mark(*args, **kwargs):
        (out / f"rank{rank}.reached_combine").touch()
        return real(*args, **kwargs)

    steps_module._combine = combine_and_mark
    items = _KillDuringIteration(patch_items(32, [20] * 6), out, rank)
    fit_distributed(CRDScorer(), items, save_path=out / "model.crd")
    raise AssertionError("rank 0 must not get past the collective when rank 1 died")


def _worker(scenario: str, out: str) -> None:
    from crd_fast.distributed import distributed_session

    torch.set_num_threads(1)
    scenarios = {"main": _scenario_main, "kill": _scenario_kill}
    with distributed_session(backend="gloo", timeout_s=60) as env:
        assert env.world_size == WORLD and env.backend == "gloo"
        scenarios[scenario](Path(out), env.rank)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])
