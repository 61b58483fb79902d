"""crd_fast.benchmark: the benchmarks compare like with like (same inputs, same scores). No timing."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch

from crd_fast import CRDScorer
from crd_fast.benchmark.config import SCORE_RTOL, BenchConfig
from crd_fast.benchmark.fit import fit_in_subprocess, fit_run, peak_rss_mb
from crd_fast.benchmark.inputs import FeatureGenerator, patch_rows
from crd_fast.benchmark.paths import (
    HeadCase,
    e2e_paths,
    fused_path,
    make_e2e_case,
    make_head_case,
    max_relative_error,
    nn_path,
    nn_scorer,
    reference_path,
)
from crd_fast.benchmark.run import run_all
from crd_fast.benchmark.table import format_table, head_key, nn_name
from crd_fast.benchmark.timing import RoundRobin, Timing, time_call, time_interleaved
from crd_fast.ops import reference

SMALL = ((24, 8, 8), (40, 4, 4))  # two layers shaped like layer2/layer3: one at half the grid


@pytest.fixture(scope="module", params=["concat", "patchcore"])
def case(request: pytest.FixtureRequest) -> HeadCase:
    gen = FeatureGenerator(layers=SMALL, rank=6, seed=3)
    return make_head_case(request.param, n_train=10, n_query=3, batch=4, generator=gen, target_dim=32)


def test_generator_is_deterministic_non_negative_and_shaped() -> None:
    gen = FeatureGenerator(layers=SMALL, rank=6, seed=1)
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
        FeatureGenerator(layers=SMALL, rank=0)
    with pytest.raises(ValueError, match="positive"):
        FeatureGenerator(layers=((0, 4, 4),))


def test_case_bank_and_scorer_hold_the_training_patches(case: HeadCase) -> None:
    gen = FeatureGenerator(layers=SMALL, rank=6, seed=3)
    rows = torch.cat([patch_rows(m, case.embedding, case.target_dim) for m in gen.batches(10, 4)])
    assert torch.equal(case.bank, rows)
    assert case.dim == (64 if case.embedding == "concat" else 32)
    # the scorer streamed batch by batch equals one fit on the whole bank
    whole = CRDScorer().fit(case.bank.double())
    assert case.scorer.n_samples == 10 * 64
    torch.testing.assert_close(case.scorer.projection.matrix, whole.projection.matrix, rtol=1e-9, atol=1e-12)
    assert torch.equal(case.patches, patch_rows(case.maps, case.embedding, case.target_dim))


def test_fused_and_reference_paths_give_the_same_scores(case: HeadCase) -> None:
    fused, ref32 = fused_path(case)(), reference_path(case)()
    spec = reference.crd_head(
        [m.double() for m in case.maps],
        case.scorer.projection.matrix,
        case.scorer.projection.offset,
        case.embedding,
        case.target_dim,
    )
    assert fused.shape == ref32.shape == (3, 8, 8)
    assert max_relative_error(fused, ref32) <= SCORE_RTOL
    assert max_relative_error(fused, spec) <= SCORE_RTOL
    # the CRD scorer on the patch rows (what an NN path searches) scores the same patches
    rows = case.scorer.score(case.patches.double()).reshape(spec.shape)
    torch.testing.assert_close(rows, spec, rtol=1e-5, atol=0)  # the rows were embedded in float32


@pytest.mark.parametrize("fraction", [0.1, 1.0])
def test_nn_paths_are_exact_nearest_neighbour_distances(case: HeadCase, fraction: float) -> None:
    pytest.importorskip("faiss")
    outs = {}
    for backend in ("faiss", "torch"):
        scorer = nn_scorer(case, fraction, backend)
        assert scorer.n_samples == (case.bank.shape[0] if fraction == 1.0 else 64)
        outs[backend] = nn_path(case, scorer)()
        brute = torch.cdist(case.patches.double(), scorer.bank.double()).min(dim=1).values.reshape(3, 8, 8)
        torch.testing.assert_close(outs[backend].double(), brute, rtol=1e-3, atol=1e-3)
    # both backends search the same subsampled bank (the same seed)
    torch.testing.assert_close(outs["faiss"], outs["torch"], rtol=1e-3, atol=1e-3)


def test_max_relative_error() -> None:
    ref = torch.tensor([1.0, 2.0, 4.0])
    assert max_relative_error(ref, ref) == 0.0
    assert max_relative_error(torch.tensor([1.0, 2.2, 4.0]), ref) == pytest.approx(0.1)


def test_time_call_runs_warmup_and_rounds() -> None:
    calls = []
    timing = time_call(lambda: calls.append(1), rounds=4, warmup=2)
    assert len(calls) == 6 and timing.rounds == 4 and len(timing.times) == 4
    assert timing.best == min(timing.times) and timing.median == statistics.median(timing.times)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_call(lambda: None, rounds=0)
    order: list[str] = []
    timings = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] * 4 and [t.rounds for t in timings.values()] == [3, 3]
    rr = RoundRobin({"x": lambda: order.append("x")})
    rr(), rr()
    assert rr.timings["x"].rounds == 2 and order[-2:] == ["x", "x"]
    rr.reset()
    assert rr.timings["x"].rounds == 0


def _row(table: str, first: str) -> list[float]:
    """The numbers of the table row starting with ``first`` (units and % signs dropped)."""
    line = next(ln for ln in table.splitlines() if ln.split()[:1] == [first])
    return [float(v.rstrip("%").replace(",", "")) for v in line.split()[1:]]


def test_table_gives_ratios_to_the_fused_head_and_shares_of_the_whole() -> None:
    T = Timing
    results = {
        head_key("concat", "fused"): T([0.2, 0.3]),
        head_key("concat", "reference"): T([0.5, 0.6]),
        head_key("concat", nn_name("faiss", 1.0)): T([40.0]),
        head_key("concat", nn_name("torch", 0.1)): T([5.0, 7.0]),
        "e2e/backbone": T([4.0]),
        "e2e/head": T([0.3]),
        "e2e/full": T([4.5]),
    }
    extra = {
        "head_sizes": {"concat": (8, 156800, 1536)},
        "errors": {"concat": 3e-7},
        "e2e": {"backbone": "wide_resnet50_2", "crop": 224, "batch": 8},
        "fit": [
            {
                "n_images": 2,
                "n_patches": 1568,
                "dim": 16,
                "patches_per_s": 1000.0,
                "solve_s": 0.5,
                "rss_before_mb": 100.0,
                "peak_rss_mb": 130.0,
                "nn_bank_mb": 0.1,
            }
        ],
    }
    table = format_table(results, None, extra)
    # best ms, median ms, rounds, x fused (best), x fused (median)
    assert _row(table, "fused") == [200.0, 250.0, 2, 1.0, 1.0]
    assert _row(table, "reference") == [500.0, 550.0, 2, 2.5, 2.2]
    assert _row(table, "nn-faiss-100%") == [40000.0, 40000.0, 1, 200.0, 160.0]
    assert _row(table, "nn-torch-10%") == [5000.0, 6000.0, 2, 25.0, 24.0]
    # images/s (best, median), share of full (best, median)
    assert _row(table, "head") == pytest.approx([8 / 0.3, 8 / 0.3, 6.7, 6.7], abs=0.01)
    assert _row(table, "full") == pytest.approx([8 / 4.5, 8 / 4.5, 100.0, 100.0], abs=0.01)
    # (images) patches, patches/s, solve s, peak RSS MB, fit adds MB, NN bank MB
    assert _row(table, "2") == [1568, 1000, 0.5, 130, 30, 0]
    assert "CRD head, concat embedding, d=1536, 8 query images, NN bank of 156,800 patches" in table
    assert "patchcore" not in table  # only what was measured
    assert "max relative difference 3.00e-07" in table
    assert "target" not in table.lower()  # the project's targets live in bench/suites/targets.py, not in the package


def test_config_rounds_and_parts() -> None:
    cfg = BenchConfig()
    assert [cfg.rounds_for(f) for f in cfg.fractions] == list(cfg.nn_rounds)
    assert BenchConfig.quick(parts=("fit",)).parts == ("fit",) and BenchConfig.quick().quick_run
    with pytest.raises(ValueError, match="unknown benchmark part"):
        run_all(BenchConfig(parts=("gpu",)))
    with pytest.raises(ValueError, match="embedding must be one of"):
        make_head_case("pca", n_train=1)


def test_fit_run_counts_and_memory_fields() -> None:
    out = fit_run(3, dim=16, batch=2, patches_per_image=10)
    assert out["n_patches"] == 30 and out["dim"] == 16 and out["patches_per_s"] > 0
    assert out["nn_bank_mb"] == pytest.approx(30 * 16 * 4 / 1e6)
    assert out["peak_rss_mb"] >= out["rss_before_mb"] > 0


def test_e2e_head_is_the_models_head() -> None:
    c = make_e2e_case("resnet18", crop=64, batch=2, n_fit=2)
    paths = e2e_paths(c)
    scores, amaps, pmaps = paths["full"]()
    torch.testing.assert_close(paths["head"](), pmaps)
    assert [tuple(f.shape) for f in paths["backbone"]()] == [(2, 128, 8, 8), (2, 256, 4, 4)]
    assert amaps.shape == (2, 64, 64) and torch.equal(scores, pmaps.flatten(1).amax(dim=1))


@pytest.mark.slow
def test_cli_bench_prints_the_table_and_writes_json(tmp_path, monkeypatch, capsys) -> None:
    from crd_fast.cli import bench

    tiny = dict(
        n_train=6,
        n_query=2,
        rounds=1,
        nn_rounds=(1, 1, 1),
        e2e_backbone="resnet18",
        e2e_crop=64,
        e2e_batch=2,
        e2e_rounds=1,
        fit_sizes=(1, 2),
        fit_dim=16,
        layers=SMALL,
        target_dim=32,
        quick_run=True,
    )
    monkeypatch.setattr(BenchConfig, "quick", classmethod(lambda cls, **kw: cls(**{**tiny, **kw})))
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    out_json = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            "bench",
            "--quick",
            "--only",
            "head",
            "--only",
            "e2e",
            "--only",
            "fit",
            "--json",
            str(out_json),
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for needle in (
        "CRD head, concat embedding",
        "CRD head, patchcore embedding",
        "nn-torch-100%",
        "End to end: resnet18",
        "Fit (CRDScorer.partial_fit",
        "torch",
    ):
        assert needle in text
    payload = json.loads(out_json.read_text())
    assert set(payload) >= {"machine", "timings", "config"}
    assert payload["timings"]["head/concat/fused"]["best_s"] > 0
    assert payload["machine"]["torch_threads"] >= 1
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "gpu"])


def test_fit_child_reports_its_own_peak_memory() -> None:
    """The child's peak is its own: a parent holding 512 MB more does not show up in it (ru_maxrss would)."""
    big = torch.ones(2**29, dtype=torch.uint8)  # 512 MB, touched
    out = fit_in_subprocess(2, dim=16, batch=1)
    assert out["n_patches"] == 2 * 784 and out["dim"] == 16
    assert out["peak_rss_mb"] + 256 < peak_rss_mb()
    del big


def test_benchmarks_refuse_to_time_the_fallback_unless_asked(monkeypatch) -> None:
    from crd_fast.benchmark import machine
    from crd_fast.ops import cpu

    monkeypatch.delenv(machine.ALLOW_REFERENCE_ENV, raising=False)
    monkeypatch.setattr(cpu, "available", lambda: True)
    machine.require_fused_cpu_pass()  # built: nothing to say
    monkeypatch.setattr(cpu, "available", lambda: False)
    with pytest.raises(RuntimeError, match=f"no compiled fused CPU pass.*{machine.ALLOW_REFERENCE_ENV}=1"):
        machine.require_fused_cpu_pass()
    monkeypatch.setenv(machine.ALLOW_REFERENCE_ENV, "1")
    machine.require_fused_cpu_pass()
