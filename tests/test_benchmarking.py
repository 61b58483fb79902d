"""crd_fast.benchmark.suite: the benchmarks compare like with like (same inputs, same scores). No timing."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch

from crd_fast import CRDScorer
from crd_fast.benchmark import suite as bm
from crd_fast.ops import reference

SMALL = ((24, 8, 8), (40, 4, 4))  # two layers shaped like layer2/layer3: one at half the grid


@pytest.fixture(scope="module", params=["concat", "patchcore"])
def case(request: pytest.FixtureRequest) -> bm.HeadCase:
    gen = bm.FeatureGenerator(layers=SMALL, rank=6, seed=3)
    return bm.make_head_case(request.param, n_train=10, n_query=3, batch=4, generator=gen, target_dim=32)


def test_generator_is_deterministic_non_negative_and_shaped() -> None:
    gen = bm.FeatureGenerator(layers=SMALL, rank=6, seed=1)
    a, b = gen.maps(2, index=5), gen.maps(2, index=5)
    other = gen.maps(2, index=6)
    assert [tuple(m.shape) for m in a] == [(2, 24, 8, 8), (2, 40, 4, 4)]
    for x, y, z in zip(a, b, other):
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert torch.equal(x, y) and not torch.equal(x, z)
        assert bool((x >= 0).all()) and bool((x == 0).any()) and bool((x > 0).any())  # ReLU-like
    batches = list(gen.batches(7, 3))
    assert [m[0].shape[0] for m in batches] == [3, 3, 1]
    with pytest.raises(ValueError, match="rank must be >= 1"):
        bm.FeatureGenerator(layers=SMALL, rank=0)
    with pytest.raises(ValueError, match="positive"):
        bm.FeatureGenerator(layers=((0, 4, 4),))


def test_case_bank_and_scorer_hold_the_training_patches(case: bm.HeadCase) -> None:
    gen = bm.FeatureGenerator(layers=SMALL, rank=6, seed=3)
    rows = torch.cat([bm.patch_rows(m, case.embedding, case.target_dim) for m in gen.batches(10, 4)])
    assert torch.equal(case.bank, rows)
    assert case.dim == (64 if case.embedding == "concat" else 32)
    # the scorer streamed batch by batch equals one fit on the whole bank
    whole = CRDScorer().fit(case.bank.double())
    assert case.scorer.n_samples == 10 * 64
    torch.testing.assert_close(case.scorer.projection.matrix, whole.projection.matrix, rtol=1e-9, atol=1e-12)
    assert torch.equal(case.patches, bm.patch_rows(case.maps, case.embedding, case.target_dim))


def test_fused_and_reference_paths_give_the_same_scores(case: bm.HeadCase) -> None:
    fused, ref32 = bm.fused_path(case)(), bm.reference_path(case)()
    spec = reference.crd_head([m.double() for m in case.maps], case.scorer.projection.matrix,
                              case.scorer.projection.offset, case.embedding, case.target_dim)
    assert fused.shape == ref32.shape == (3, 8, 8)
    assert bm.max_relative_error(fused, ref32) <= bm.SCORE_RTOL
    assert bm.max_relative_error(fused, spec) <= bm.SCORE_RTOL
    # the CRD scorer on the patch rows (what an NN path searches) scores the same patches
    rows = case.scorer.score(case.patches.double()).reshape(spec.shape)
    torch.testing.assert_close(rows, spec, rtol=1e-5, atol=0)  # the rows were embedded in float32


@pytest.mark.parametrize("fraction", [0.1, 1.0])
def test_nn_paths_are_exact_nearest_neighbour_distances(case: bm.HeadCase, fraction: float) -> None:
    pytest.importorskip("faiss")
    outs = {}
    for backend in ("faiss", "torch"):
        scorer = bm.nn_scorer(case, fraction, backend)
        assert scorer.n_samples == (case.bank.shape[0] if fraction == 1.0 else 64)
        outs[backend] = bm.nn_path(case, scorer)()
        brute = torch.cdist(case.patches.double(), scorer.bank.double()).min(dim=1).values.reshape(3, 8, 8)
        torch.testing.assert_close(outs[backend].double(), brute, rtol=1e-3, atol=1e-3)
    # both backends search the same subsampled bank (the same seed)
    torch.testing.assert_close(outs["faiss"], outs["torch"], rtol=1e-3, atol=1e-3)


def test_max_relative_error() -> None:
    ref = torch.tensor([1.0, 2.0, 4.0])
    assert bm.max_relative_error(ref, ref) == 0.0
    assert bm.max_relative_error(torch.tensor([1.0, 2.2, 4.0]), ref) == pytest.approx(0.1)


def test_time_call_runs_warmup_and_rounds() -> None:
    calls = []
    timing = bm.time_call(lambda: calls.append(1), rounds=4, warmup=2)
    assert len(calls) == 6 and timing.rounds == 4 and len(timing.times) == 4
    assert timing.best == min(timing.times) and timing.median == statistics.median(timing.times)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bm.time_call(lambda: None, rounds=0)
    order: list[str] = []
    timings = bm.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] * 4 and [t.rounds for t in timings.values()] == [3, 3]
    rr = bm.RoundRobin({"x": lambda: order.append("x")})
    rr(), rr()
    assert rr.timings["x"].rounds == 2 and order[-2:] == ["x", "x"]
    rr.reset()
    assert rr.timings["x"].rounds == 0


def test_targets_and_table_from_results() -> None:
    T = bm.Timing
    results = {
        bm.head_key("concat", "fused"): T([0.2, 0.3]), bm.head_key("concat", "reference"): T([0.5, 0.6]),
        bm.head_key("concat", bm.nn_name("faiss", 1.0)): T([40.0]), bm.head_key("concat", bm.nn_name("torch", 1.0)): T([50.0]),
        "e2e/backbone": T([4.0]), "e2e/head": T([0.3]), "e2e/full": T([4.5]),
    }
    extra = {"head_sizes": {"concat": (8, bm.TARGET_BANK_PATCHES, 1536)}, "errors": {"concat": 3e-7},
             "e2e": {"backbone": "wide_resnet50_2", "crop": 224, "batch": 8}}
    fused, nn, share = bm.targets(results, extra)
    assert fused.value == pytest.approx(2.5) and fused.median_value == pytest.approx(0.55 / 0.25) and fused.met
    assert nn.value == pytest.approx(200.0) and nn.met and "faiss" in nn.name  # the faster NN backend
    assert share.value == pytest.approx(0.3 / 4.5) and share.met
    slow = dict(results, **{"e2e/head": T([1.0])})
    assert bm.targets(slow, extra)[2].met is False and "MISSED" in bm.targets(slow, extra)[2].line()
    quick = dict(extra, head_sizes={"concat": (8, 1000, 1536)})
    small_bank = bm.targets(results, quick)[1]
    assert small_bank.met is None and "not comparable" in small_bank.line() and "defined for 156,800" in small_bank.line()
    table = bm.format_table(results, None, extra)
    assert "nn-faiss-100%" in table and "200.0" in table and "[met]" in table
    assert bm.targets({})[0].met is None and "not measured" in bm.targets({})[0].line()


def test_config_rounds_and_parts() -> None:
    cfg = bm.BenchConfig()
    assert [cfg.rounds_for(f) for f in cfg.fractions] == list(cfg.nn_rounds)
    assert bm.BenchConfig.quick(parts=("fit",)).parts == ("fit",) and bm.BenchConfig.quick().quick_run
    with pytest.raises(ValueError, match="unknown benchmark part"):
        bm.run_all(bm.BenchConfig(parts=("gpu",)))
    with pytest.raises(ValueError, match="embedding must be one of"):
        bm.make_head_case("pca", n_train=1)


def test_fit_run_counts_and_memory_fields() -> None:
    out = bm.fit_run(3, dim=16, batch=2, patches_per_image=10)
    assert out["n_patches"] == 30 and out["dim"] == 16 and out["patches_per_s"] > 0
    assert out["nn_bank_mb"] == pytest.approx(30 * 16 * 4 / 1e6)
    assert out["peak_rss_mb"] >= out["rss_before_mb"] > 0


def test_e2e_head_is_the_models_head() -> None:
    c = bm.make_e2e_case("resnet18", crop=64, batch=2, n_fit=2)
    paths = bm.e2e_paths(c)
    scores, amaps, pmaps = paths["full"]()
    torch.testing.assert_close(paths["head"](), pmaps)
    assert [tuple(f.shape) for f in paths["backbone"]()] == [(2, 128, 8, 8), (2, 256, 4, 4)]
    assert amaps.shape == (2, 64, 64) and torch.equal(scores, pmaps.flatten(1).amax(dim=1))


@pytest.mark.slow
def test_cli_bench_prints_the_table_and_writes_json(tmp_path, monkeypatch, capsys) -> None:
    from crd_fast.cli import bench

    tiny = dict(n_train=6, n_query=2, rounds=1, nn_rounds=(1, 1, 1), e2e_backbone="resnet18", e2e_crop=64,
                e2e_batch=2, e2e_rounds=1, fit_sizes=(1, 2), fit_dim=16, layers=SMALL, target_dim=32, quick_run=True)
    monkeypatch.setattr(bm.BenchConfig, "quick", classmethod(lambda cls, **kw: cls(**{**tiny, **kw})))
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    out_json = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "--quick", "--only", "head", "--only", "e2e", "--only", "fit",
                              "--json", str(out_json), "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for needle in ("CRD head, concat embedding", "CRD head, patchcore embedding", "nn-torch-100%",
                   "End to end: resnet18", "Fit (CRDScorer.partial_fit", "Targets", "torch"):
        assert needle in text
    payload = json.loads(out_json.read_text())
    assert set(payload) >= {"machine", "timings", "targets", "config"}
    assert payload["timings"]["head/concat/fused"]["best_s"] > 0
    assert payload["machine"]["torch_threads"] >= 1 and len(payload["targets"]) == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "gpu"])


def test_fit_child_reports_its_own_peak_memory() -> None:
    """The child's peak is its own: a parent holding 512 MB more does not show up in it (ru_maxrss would)."""
    big = torch.ones(2**29, dtype=torch.uint8)  # 512 MB, touched
    out = bm.fit_in_subprocess(2, dim=16, batch=1)
    assert out["n_patches"] == 2 * 784 and out["dim"] == 16
    assert out["peak_rss_mb"] + 256 < bm._rss_mb()
    del big
