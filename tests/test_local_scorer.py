"""LocalCRDScorer and its one-pass Frequent Directions statistics, against float64 direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cuda, dense_local_scores

from crd_fast import CRDScorer, LocalCRDScorer, ModelFileError
from crd_fast.core.dtypes import NumericOverflowError
from crd_fast.core.local import LocalStatistics, local_eigenpairs_from_patches
from crd_fast.core.sketch import FrequentDirections


def _grids(rng: np.random.Generator, n: int, p: int = 4, d: int = 10, decay: float = 0.75) -> torch.Tensor:
    """(n, p, d) float64 grids: per-position means and rotations differ, eigenvalues decay like decay^(2i)."""
    base = rng.normal(size=(p, d)) * 3
    rot = np.linalg.qr(rng.normal(size=(p, d, d)))[0]
    x = rng.normal(size=(n, p, d)) * decay ** np.arange(d)
    return torch.from_numpy(base + np.einsum("npd,ped->npe", x, rot))


def _projectors(values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """V E V^T per position: eigenpairs compared without their signs."""
    return (vectors * values[:, None, :]) @ vectors.transpose(1, 2)


def _fit_in(scorer: LocalCRDScorer, grids: torch.Tensor, sizes) -> LocalCRDScorer:
    for chunk in torch.split(grids, list(sizes)):
        scorer.partial_fit(chunk)
    return scorer


def _random_sizes(rng: np.random.Generator, n: int) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.integers(1, 9), n - sum(sizes))))
    return sizes


def _check_fd_guarantee(stats: LocalStatistics, train: torch.Tensor) -> None:
    """0 <= N C_p - B_p^T B_p <= discarded_p <= ||X_p - [X_p]_k||_F^2 / (ell - k) for every k < ell."""
    n, p, d = train.shape
    ell = stats.sketch
    xc = train - train.mean(0)
    for j in range(p):
        scatter = xc[:, j].T @ xc[:, j]
        b = stats.fd.rows()[j]
        err = torch.linalg.eigvalsh(scatter - b.T @ b)
        tol = 1e-10 * float(torch.trace(scatter))
        assert float(err.min()) >= -tol  # the sketch never overestimates
        discarded = float(stats.fd.discarded[j])
        assert float(err.max()) <= discarded + tol
        tails = torch.linalg.eigvalsh(scatter).flip(0).clamp_min(0)
        bound = min(float(tails[k:].sum()) / (ell - k) for k in range(ell))
        assert discarded <= bound + tol


# ---- exact regime: N <= sketch -------------------------------------------------------------------
def test_few_images_give_the_exact_eigenpairs_and_the_dense_scores(rng):
    train, test = _grids(rng, 12), _grids(rng, 5)
    scorer = _fit_in(LocalCRDScorer(lam_rel=0.05, shrinkage=0.4, rank=4, sketch=16), train, [3, 1, 6, 2])
    assert scorer.statistics.fd.shrinks == 0 and bool((scorer.error_bounds == 0).all())
    means, vals, vecs = local_eigenpairs_from_patches(train, 4)
    got_vals, got_vecs = scorer.statistics.local_eigenpairs(4)
    torch.testing.assert_close(scorer.statistics.means, means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_vals, vals, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_projectors(got_vals, got_vecs), _projectors(vals, vecs), rtol=1e-8, atol=1e-10)
    scores = scorer.score(test)
    assert scores.dtype == torch.float64 and scores.shape == (5, 4)
    torch.testing.assert_close(scores, dense_local_scores(train, test, 0.4, 4, 0.05), rtol=1e-9, atol=1e-12)


def test_rank_beyond_the_data_keeps_all_of_c_p(rng):
    # N = 5 images: C_p has rank 4, so k = 7 keeps all of it (zero-padded directions change nothing).
    train, test = _grids(rng, 5, d=8), _grids(rng, 3, d=8)
    scorer = LocalCRDScorer(lam_rel=0.01, shrinkage=0.5, rank=7, sketch=8).fit(train)
    vals, vecs = scorer.statistics.local_eigenpairs(7)
    assert vals.shape == (4, 7) and vecs.shape == (4, 8, 7) and bool((vals[:, 5:] == 0).all())
    torch.testing.assert_close(scorer.score(test), dense_local_scores(train, test, 0.5, 7, 0.01), rtol=1e-9, atol=1e-12)


def test_options_change_the_model_without_refitting(rng):
    train, test = _grids(rng, 10), _grids(rng, 3)
    scorer = LocalCRDScorer(sketch=16, rank=3).fit(train)
    stats = scorer.statistics
    for lam_rel, a, k in ((1e-3, 0.5, 3), (0.2, 0.5, 3), (0.2, 0.1, 3), (0.2, 0.1, 6), (0.03, 1.0, 1)):
        scorer.lam_rel, scorer.shrinkage, scorer.rank = lam_rel, a, k
        torch.testing.assert_close(
            scorer.score(test), dense_local_scores(train, test, a, k, lam_rel), rtol=1e-9, atol=1e-12
        )
        assert scorer.statistics is stats and scorer.n_images == 10
        assert scorer.lam() == pytest.approx(lam_rel * float(torch.trace(stats.within_covariance())) / 10, rel=1e-9)


def test_float32_and_numpy_inputs(rng):
    train, test = _grids(rng, 9), _grids(rng, 4)
    scorer = LocalCRDScorer(sketch=16, rank=4).fit(train.numpy().astype(np.float32))
    expected = LocalCRDScorer(sketch=16, rank=4).fit(train.float().double()).score(test.float().double())
    got = scorer.score(test.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=0)
    arr = scorer.score(test.numpy())
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float64 and arr.shape == (4, 4)
    assert scorer.score(test[:0]).shape == (0, 4)


@cuda
def test_cuda_grids_fit_and_score_like_cpu_grids(rng):
    train, test = _grids(rng, 11), _grids(rng, 3)
    cpu = LocalCRDScorer(sketch=8, rank=3).fit(train)
    gpu = LocalCRDScorer(sketch=8, rank=3).fit(train.cuda())
    for scorer in (cpu, gpu):
        got = scorer.score(test.cuda())
        assert got.device.type == "cuda" and got.dtype == torch.float64
        torch.testing.assert_close(got.cpu(), cpu.score(test), rtol=1e-9, atol=1e-12)
        assert scorer.score(test.float().cuda()).dtype == torch.float32


# ---- beyond the sketch: the FD guarantee ----------------------------------------------------------------
@pytest.mark.parametrize("ell", [6, 12])
def test_fd_guarantee_for_the_centred_data_with_any_batching(rng, ell):
    train = _grids(rng, 90, p=3, d=20, decay=0.8)
    for sizes in ([90], _random_sizes(rng, 90), [1] * 90):
        stats = LocalStatistics(3, 20, ell)
        for chunk in torch.split(train, sizes):
            stats.update(chunk)
        assert stats.fd.shrinks > 0 and stats.fd.filled < 2 * ell
        torch.testing.assert_close(stats.means, train.mean(0), rtol=1e-12, atol=1e-12)
        _check_fd_guarantee(stats, train)
        # Weyl: each sketched eigenvalue of C_p is within discarded_p / N below the exact one.
        vals, _ = stats.local_eigenpairs(ell - 1)
        _, exact, _ = local_eigenpairs_from_patches(train, ell - 1)
        gap = exact - vals
        assert float(gap.min()) >= -1e-10 * float(exact.max())
        assert bool((gap <= stats.error_bounds()[:, None] * (1 + 1e-9) + 1e-12).all())


def test_fd_sketch_on_a_fast_decaying_spectrum_is_close(rng):
    # With a spectrum that decays fast the bound is small: the top eigenvalues are nearly exact
    # (here the a-priori bound is ~1e-4 of the largest eigenvalue).
    train = _grids(rng, 120, p=2, d=16, decay=0.4)
    stats = LocalStatistics(2, 16, 8)
    for chunk in torch.split(train, 7):
        stats.update(chunk)
    assert stats.fd.shrinks > 0
    vals, _ = stats.local_eigenpairs(3)
    _, exact, _ = local_eigenpairs_from_patches(train, 3)
    assert bool(((exact - vals).abs() <= 1e-3 * exact[:, :1]).all())


def test_fd_sketch_rows_and_merge_of_plain_rows(rng):
    # The sketch alone, on rows A: guarantee for A, and two merged halves keep it for the stacked rows.
    a = torch.from_numpy(rng.normal(size=(2, 70, 12)) * 0.7 ** np.arange(12))
    one = FrequentDirections(2, 12, 5).append(a)
    half = FrequentDirections(2, 12, 5).append(a[:, :33]).merge(FrequentDirections(2, 12, 5).append(a[:, 33:]))
    for sketch in (one, half):
        for j in range(2):
            err = torch.linalg.eigvalsh(a[j].T @ a[j] - sketch.rows()[j].T @ sketch.rows()[j])
            assert float(err.min()) >= -1e-10 and float(err.max()) <= float(sketch.discarded[j]) + 1e-10
            tails = torch.linalg.eigvalsh(a[j].T @ a[j]).flip(0)
            assert float(sketch.discarded[j]) <= min(float(tails[k:].sum()) / (5 - k) for k in range(5)) + 1e-10
    exact = FrequentDirections(2, 12, 40).append(a[:, :20])
    torch.testing.assert_close(exact.rows(), a[:, :20], rtol=0, atol=0)


# ---- merge, partial_fit, pooled statistics ---------------------------------------------------------------
def test_merge_of_two_halves_equals_one_fit_when_exact(rng):
    train, test = _grids(rng, 14), _grids(rng, 4)
    whole = LocalCRDScorer(sketch=16, rank=5).fit(train)
    left = _fit_in(LocalCRDScorer(sketch=16, rank=5), train[:6], [2, 4])
    right = _fit_in(LocalCRDScorer(sketch=16, rank=5), train[6:], [5, 3])
    merged = left.merge(right)
    assert merged.n_images == 14 and merged.statistics.fd.shrinks == 0
    torch.testing.assert_close(merged.statistics.means, whole.statistics.means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        merged.statistics.within_covariance(), whole.statistics.within_covariance(), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        _projectors(*merged.statistics.local_eigenpairs(5)),
        _projectors(*whole.statistics.local_eigenpairs(5)),
        rtol=1e-8,
        atol=1e-10,
    )
    torch.testing.assert_close(merged.score(test), whole.score(test), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(merged.score(test), dense_local_scores(train, test, 0.5, 5, 0.01), rtol=1e-9, atol=1e-12)
    # merging into an unfitted scorer copies; merging an unfitted one changes nothing
    empty = LocalCRDScorer(sketch=16, rank=5).merge(whole).merge(LocalCRDScorer(sketch=16, rank=5))
    torch.testing.assert_close(empty.score(test), whole.score(test), rtol=0, atol=0)
    assert empty.statistics is not whole.statistics


def test_merge_beyond_the_sketch_keeps_the_fd_bound(rng):
    train = _grids(rng, 80, p=3, d=14, decay=0.8)
    parts = [LocalStatistics(3, 14, 6) for _ in range(3)]
    for stats, chunk in zip(parts, torch.split(train, [30, 41, 9])):
        for piece in torch.split(chunk, 4):
            stats.update(piece)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.images == 80 and merged.fd.shrinks > 0
    torch.testing.assert_close(merged.means, train.mean(0), rtol=1e-12, atol=1e-12)
    _check_fd_guarantee(merged, train)


def test_partial_fit_in_batches_equals_fit(rng):
    train, test = _grids(rng, 15), _grids(rng, 3)
    whole = LocalCRDScorer(sketch=16, rank=4).fit(train)
    batched = _fit_in(LocalCRDScorer(sketch=16, rank=4), train, _random_sizes(rng, 15))
    torch.testing.assert_close(batched.score(test), whole.score(test), rtol=1e-9, atol=1e-12)
    assert batched.n_images == 15 and batched.positions == 4 and batched.dim == 10
    refit = batched.fit(train[:7])  # fit discards the earlier images
    assert refit.n_images == 7
    torch.testing.assert_close(
        refit.score(test), LocalCRDScorer(sketch=16, rank=4).fit(train[:7]).score(test), rtol=0, atol=0
    )


def test_pooled_statistics_are_exact_and_give_the_global_crd(rng):
    train, test = _grids(rng, 70, p=3, d=8), _grids(rng, 4, p=3, d=8)
    scorer = _fit_in(LocalCRDScorer(rank=3, sketch=4), train, _random_sizes(rng, 70))
    pooled = scorer.pooled_statistics
    flat = train.reshape(-1, 8)
    assert pooled.count == 210
    torch.testing.assert_close(pooled.mean, flat.mean(0), rtol=1e-12, atol=1e-12)
    xc = flat - flat.mean(0)
    torch.testing.assert_close(pooled.scatter, xc.T @ xc, rtol=1e-10, atol=1e-10)
    # within-position covariance exact too, even though the sketches shrank
    pc = train - train.mean(0)
    expected = torch.einsum("npd,npe->de", pc, pc) / 210
    torch.testing.assert_close(scorer.statistics.within_covariance(), expected, rtol=1e-10, atol=1e-12)
    global_crd = CRDScorer.from_statistics(pooled, lam_rel=0.02)
    direct = CRDScorer(lam_rel=0.02).fit(flat)
    torch.testing.assert_close(
        global_crd.score(test.reshape(-1, 8)), direct.score(test.reshape(-1, 8)), rtol=1e-9, atol=1e-12
    )
    global_crd.partial_fit(flat[:5])  # a copy: the local scorer's statistics do not move
    assert scorer.pooled_statistics.count == 210


# ---- persistence -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [9, 40])  # exact, and shrunk sketches
def test_save_load_gives_identical_scores(rng, tmp_path, n):
    train, test = _grids(rng, n), _grids(rng, 5)
    scorer = _fit_in(LocalCRDScorer(lam_rel=3e-3, shrinkage=0.3, rank=4, sketch=8), train, _random_sizes(rng, n))
    path = tmp_path / "local.safetensors"
    scorer.save(path)
    loaded = LocalCRDScorer.load(path)
    assert (loaded.lam_rel, loaded.shrinkage, loaded.rank, loaded.sketch) == (3e-3, 0.3, 4, 8)
    assert loaded.n_images == n and loaded.statistics.fd.shrinks == scorer.statistics.fd.shrinks
    torch.testing.assert_close(loaded.score(test), scorer.score(test), rtol=0, atol=0)
    torch.testing.assert_close(loaded.score(test.float()), scorer.score(test.float()), rtol=0, atol=0)
    # a loaded scorer keeps fitting like the original
    more = _grids(rng, 6)
    torch.testing.assert_close(
        loaded.partial_fit(more).score(test), scorer.partial_fit(more).score(test), rtol=0, atol=0
    )
    tensors, fields = scorer.state(prefix="local.")
    assert all(name.startswith("local.") for name in tensors)
    again = LocalCRDScorer.from_state(tensors, fields, prefix="local.")
    torch.testing.assert_close(again.score(test), scorer.score(test), rtol=0, atol=0)


def _state(rng):
    scorer = _fit_in(LocalCRDScorer(sketch=6, rank=2), _grids(rng, 20), [7, 7, 6])
    return scorer.state()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, f: t.pop("sketch_rows"), "tensor 'sketch_rows' is missing"),
        (lambda t, f: t.update(means=t["means"][:, :5]), r"'means' has shape \(4, 5\), expected \(4, 10\)"),
        (lambda t, f: t.update(means=t["means"].float()), "'means' is torch.float32, expected float64"),
        (lambda t, f: t["pooled_scatter"].__setitem__((0, 0), float("nan")), "'pooled_scatter' holds NaN or Inf"),
        (lambda t, f: t.update(sketch_rows=torch.zeros(4, 12, 10, dtype=torch.float64)), "m < 12"),
        (lambda t, f: t["sketch_discarded"].__setitem__(0, -1.0), "discarded mass must be >= 0"),
        (lambda t, f: t["pooled_mean"].__setitem__(0, 1e3), "pooled mean is not the mean of the per-position"),
        (lambda t, f: f.update(rank=6), r"rank must be an integer in \[1, sketch - 1 = 5\]"),
        (lambda t, f: f.update(shrinkage=1.5), r"shrinkage must be a number in \[0, 1\]"),
        (lambda t, f: f.update(lam_rel=-1.0), "lam_rel must be a positive"),
        (lambda t, f: f.update(sketch="6"), "sketch must be an integer"),
        (lambda t, f: f.update(images=1.5), r"images=1.5 is not an integer"),
        (lambda t, f: f.update(positions=5), r"'means' has shape \(4, 10\), expected \(5, 10\)"),
        (lambda t, f: f.update(lam=f["lam"] * 1.01), "but the statistics give"),
        (lambda t, f: f.update(lam=float("inf")), "lam=inf is not a positive finite number"),
        (lambda t, f: f.pop("shrinkage"), "field 'shrinkage' is missing"),
    ],
)
def test_corrupt_state_is_refused(rng, edit, message):
    tensors, fields = _state(rng)
    tensors = {k: v.clone() for k, v in tensors.items()}
    fields = dict(fields)
    edit(tensors, fields)
    with pytest.raises(ModelFileError, match=message):
        LocalCRDScorer.from_state(tensors, fields, path="m.safetensors")


def test_edited_or_foreign_files_are_refused(rng, tmp_path):
    scorer = LocalCRDScorer(sketch=6, rank=2).fit(_grids(rng, 8))
    path = tmp_path / "local.safetensors"
    scorer.save(path)
    raw = bytearray(path.read_bytes())
    raw[-9] ^= 0xFF  # a byte of the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        LocalCRDScorer.load(path)
    CRDScorer().fit(torch.randn(10, 3, dtype=torch.float64)).save(path)
    with pytest.raises(ModelFileError, match="holds a 'crd_scorer' model, expected 'local_crd_scorer'"):
        LocalCRDScorer.load(path)


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_input_is_refused(rng):
    scorer = LocalCRDScorer(sketch=8, rank=2)
    with pytest.raises(RuntimeError, match="not fitted yet"):
        scorer.score(_grids(rng, 2))
    with pytest.raises(ValueError, match=r"must be a 3-D \(images, positions, d\)"):
        scorer.fit(torch.zeros(5, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="has 1 image"):
        scorer.fit(_grids(rng, 1))
    bad = _grids(rng, 3)
    bad[1, 2, 3] = float("nan")
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite values \(1 NaN, 1 Inf\)"):
        scorer.fit(bad)
    assert scorer.n_images == 0 and scorer.positions is None
    with pytest.raises(TypeError, match="floating-point"):
        scorer.fit(np.zeros((3, 4, 10), dtype=np.int64))
    scorer.partial_fit(_grids(rng, 1))
    with pytest.raises(ValueError, match="needs at least 2 training images, got 1"):
        scorer.score(_grids(rng, 2))
    scorer.partial_fit(_grids(rng, 4))
    with pytest.raises(ValueError, match="has 5 positions per image, but the model was fitted with 4"):
        scorer.partial_fit(_grids(rng, 2, p=5))
    with pytest.raises(ValueError, match="d=9, but the model was fitted with d=10"):
        scorer.partial_fit(_grids(rng, 2, d=9))
    with pytest.raises(ValueError, match="has 3 positions per image"):
        scorer.score(_grids(rng, 2, p=3))
    before = scorer.score(_grids(rng, 2))
    with pytest.raises(NumericOverflowError, match="overflowed float64"):
        scorer.partial_fit(_grids(rng, 2) * 1e200)
    assert scorer.n_images == 5  # the failed batch left nothing behind
    assert scorer.score(_grids(rng, 2)).shape == before.shape


def test_mismatched_merge_is_refused(rng):
    a = LocalCRDScorer(sketch=8, rank=2).fit(_grids(rng, 3))
    with pytest.raises(ValueError, match=r"different options: \(lam_rel, shrinkage, rank, sketch\)"):
        a.merge(LocalCRDScorer(sketch=8, rank=3).fit(_grids(rng, 3)))
    with pytest.raises(ValueError, match="different options"):
        a.merge(LocalCRDScorer(sketch=10, rank=2).fit(_grids(rng, 3)))
    with pytest.raises(ValueError, match=r"fitted on \(P, d\) = \(5, 10\) into one fitted on \(4, 10\)"):
        a.merge(LocalCRDScorer(sketch=8, rank=2).fit(_grids(rng, 3, p=5)))
    with pytest.raises(ValueError, match=r"fitted on \(P, d\) = \(4, 7\)"):
        a.merge(LocalCRDScorer(sketch=8, rank=2).fit(_grids(rng, 3, d=7)))
    with pytest.raises(TypeError, match="can only merge a LocalCRDScorer"):
        a.merge(CRDScorer())
    with pytest.raises(ValueError, match=r"\(P, d, sketch\)"):
        LocalStatistics(4, 10, 8).merge(LocalStatistics(4, 10, 9))
    assert a.n_images == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam_rel": 0.0}, "lam_rel must be a positive"),
        ({"lam_rel": 1e-12}, "below the floor"),
        ({"lam_rel": True}, "lam_rel must be a number"),
        ({"shrinkage": -0.1}, r"shrinkage must be a number in \[0, 1\]"),
        ({"shrinkage": float("nan")}, "shrinkage must be a finite number"),
        ({"rank": 0}, r"rank must be an integer in \[1, sketch - 1 = 63\]"),
        ({"rank": 64}, r"rank must be an integer in \[1, sketch - 1 = 63\]"),
        ({"rank": 2.5}, "rank must be an integer"),
        ({"sketch": 1}, "sketch must be an integer >= 2"),
        ({"sketch": 8.0}, "sketch must be an integer >= 2"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalCRDScorer(**kwargs)
    scorer = LocalCRDScorer()
    name = next(iter(kwargs))
    if name != "sketch":
        with pytest.raises(ValueError, match=message):
            setattr(scorer, name, kwargs[name])
        assert (scorer.lam_rel, scorer.shrinkage, scorer.rank) == (0.01, 0.5, 32)
    else:
        with pytest.raises(AttributeError):
            scorer.sketch = 32


# ---- storage: chunks of positions, float32 for float32 features ------------------------------------------
def test_chunked_storage_is_the_one_buffer_sketch(rng, monkeypatch):
    """Chunks of positions (each shrunk on its own) give exactly the sketch of one buffer."""
    from crd_fast.core import sketch as sketch_module

    a = torch.from_numpy(rng.normal(size=(7, 50, 12)) * 0.8 ** np.arange(12))
    whole = FrequentDirections(7, 12, 5).append(a)
    monkeypatch.setattr(sketch_module, "CHUNK_BYTES", 1)  # one position per chunk
    chunked = FrequentDirections(7, 12, 5).append(a[:, :23]).append(a[:, 23:])
    assert len(chunked.chunk_slices()) == 7 and len(whole.chunk_slices()) == 1
    assert chunked.shrinks == whole.shrinks > 0 and chunked.filled == whole.filled
    torch.testing.assert_close(chunked.rows(), whole.rows(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.discarded, whole.discarded, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.chunk_rows(3), whole.rows()[3:4], rtol=1e-12, atol=1e-12)


def test_float32_features_are_sketched_in_float32_within_the_fd_guarantee(rng):
    """float32 grids: the sketch is stored and shrunk in float32; its C_p eigenpairs are those of the float64 sketch
    of the same (float32) grids to ~1e-6 of the largest eigenvalue, far inside the FD bound; float64 grids promote
    it, and a stored float32 sketch loads as one."""
    train = _grids(rng, 90, p=3, d=20, decay=0.8).float()
    narrow, wide = LocalStatistics(3, 20, 6), LocalStatistics(3, 20, 6)
    for chunk in torch.split(train, 7):
        narrow.update(chunk)
        wide.update(chunk.double())
    assert narrow.fd.dtype == torch.float32 and wide.fd.dtype == torch.float64
    assert narrow.fd.shrinks == wide.fd.shrinks > 0
    vals, vecs = narrow.local_eigenpairs(3)
    wide_vals, wide_vecs = wide.local_eigenpairs(3)
    top = float(wide_vals.max())
    torch.testing.assert_close(vals, wide_vals, rtol=0, atol=2e-6 * top)
    torch.testing.assert_close(_projectors(vals, vecs), _projectors(wide_vals, wide_vecs), rtol=0, atol=2e-5 * top)
    assert float((vals - wide_vals).abs().max()) < 1e-3 * float(wide.error_bounds().max())
    _check_fd_guarantee(wide, train.double())
    # the stored float32 rows load as a float32 sketch; float64 rows make it float64
    tensors, fields = narrow.state()
    loaded = LocalStatistics.from_state(tensors, fields)
    assert loaded.fd.dtype == torch.float32
    torch.testing.assert_close(loaded.fd.rows(), narrow.fd.rows(), rtol=0, atol=0)
    loaded.update(train[:4].double())
    assert loaded.fd.dtype == torch.float64
