"""What the benchmarks share: their inputs, the timed paths, timing, and the ratio table.

Used by the pytest-benchmark suites in bench/ and by ``crd-fast bench``, so both compare the same
paths on the same inputs (docs/DESIGN.md "What fast means"):

* head: the fused op (``crd_fast.ops.crd_head``) vs the unfused float32 reference path vs exact
  nearest-neighbour search (``NNScorer``, faiss IndexFlatL2 and chunked torch matmul) over memory
  banks of 1%, 10% and 100% of the training patches, all on the SAME random feature maps;
* fit: patches/s and peak memory of ``CRDScorer.partial_fit`` as the training set grows, one child
  process per size (so each peak is its own);
* end to end: images/s of the detector's ``InferenceModel`` (backbone + head + map) vs backbone alone.

The features are random (no weights or data sets can be downloaded here), with a realistic shape:
wide_resnet50_2's layer2 (512 x 28 x 28) and layer3 (1024 x 14 x 14) at 224 px, low rank plus noise,
non-negative like ReLU outputs. Times are wall clock on whatever machine runs them: read the ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..core.embedding import check_embedding, embed_patches, embedding_dim, patch_matrix
from ..ops import reference
from ..scorers.nn import NNScorer
from ..scorers.crd import CRDScorer

#: wide_resnet50_2 layer2 and layer3 maps at 224 px: (channels, height, width).
WRN50_LAYERS: tuple[tuple[int, int, int], ...] = ((512, 28, 28), (1024, 14, 14))
#: Memory banks as fractions of all training patches.
BANK_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 1.0)
EMBEDDINGS: tuple[str, ...] = ("concat", "patchcore")
#: Relative tolerance of "the same scores" (issue 4's target for the fused head vs the reference).
SCORE_RTOL = 1e-4

# Targets of issue 4, on the CPU.
TARGET_FUSED_SPEEDUP = 1.6
TARGET_NN_SPEEDUP = 140.0
TARGET_HEAD_SHARE = 0.10


# ---- machine --------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a timing depends on: CPU, cores, torch version and threads, the fused CPU pass, GPU, date."""
    from ..ops import cpu as cpu_kernels

    try:
        import faiss

        faiss_threads: Optional[int] = int(faiss.omp_get_max_threads())
    except ImportError:
        faiss_threads = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss_threads,
        "fused_cpu_pass": cpu_kernels.available(),
        "fused_cpu_openmp": cpu_kernels.openmp(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def describe_machine(info: dict[str, Any]) -> str:
    gpu = info["cuda"] or "none"
    return (f"{info['cpu']}, {info['cores']} cores; torch {info['torch']} with {info['torch_threads']} threads, "
            f"faiss threads {info['faiss_threads']}; fused CPU pass built: {info['fused_cpu_pass']} "
            f"(OpenMP {info['fused_cpu_openmp']}); GPU: {gpu}; {info['date']}")


# ---- random inputs --------------------------------------------------------------------------------
class FeatureGenerator:
    """Random backbone-like feature maps: ReLU(low-rank signal + noise), deterministic per (seed, index).

    Args:
        layers: (channels, height, width) of each layer's map.
        rank: dimension of the signal subspace of each layer.
        noise: standard deviation of the isotropic noise (the signal has unit scale per latent).
        seed: seed of the per-layer bases; the maps of item ``index`` are seeded by (seed, index).
    """

    def __init__(self, layers: Sequence[tuple[int, int, int]] = WRN50_LAYERS, rank: int = 32,
                 noise: float = 0.5, seed: int = 0) -> None:
        if not layers or any(len(l) != 3 or min(l) < 1 for l in layers):
            raise ValueError(f"layers must be a non-empty list of positive (C, H, W), got {layers!r}")
        if rank < 1 or noise < 0:
            raise ValueError(f"rank must be >= 1 and noise >= 0, got rank={rank}, noise={noise}")
        self.layers = tuple(tuple(int(v) for v in l) for l in layers)
        self.rank, self.noise, self.seed = int(rank), float(noise), int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        # decaying column scales: a spectrum that falls off like a CNN's, not a flat one
        decay = 1.0 / torch.arange(1, self.rank + 1, dtype=torch.float32).sqrt()
        self._bases = [torch.randn(self.rank, c, generator=gen) * decay[:, None] for c, _, _ in self.layers]
        self._bias = [0.3 * torch.randn(c, generator=gen) for c, _, _ in self.layers]

    @property
    def channels(self) -> list[int]:
        return [c for c, _, _ in self.layers]

    @property
    def patches_per_image(self) -> int:
        return self.layers[0][1] * self.layers[0][2]

    def maps(self, n_images: int, index: int = 0) -> list[Tensor]:
        """(n_images, C_l, H_l, W_l) float32 maps, one per layer, contiguous NCHW."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * int(index) + 1)
        out = []
        for (c, h, w), basis, bias in zip(self.layers, self._bases, self._bias):
            codes = torch.randn(n_images * h * w, self.rank, generator=gen)
            x = torch.addmm(bias, codes, basis)
            x.add_(torch.randn(x.shape, generator=gen), alpha=self.noise).relu_()
            out.append(x.reshape(n_images, h, w, c).permute(0, 3, 1, 2).contiguous())
        return out

    def batches(self, n_images: int, batch: int) -> Iterator[list[Tensor]]:
        """Maps of ``n_images`` images, ``batch`` at a time (each batch seeded by its position)."""
        for i, start in enumerate(range(0, n_images, batch)):
            yield self.maps(min(batch, n_images - start), index=i)


def random_patches(n: int, dim: int, rank: int = 32, noise: float = 0.5, seed: int = 0) -> Tensor:
    """(n, dim) float32 ReLU(low-rank + noise) patch rows, like concatenated CNN features."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=torch.Generator().manual_seed(12345))
    basis /= torch.arange(1, rank + 1, dtype=torch.float32).sqrt()[:, None]
    x = torch.randn(n, rank, generator=gen) @ basis
    return x.add_(torch.randn(x.shape, generator=gen), alpha=noise).relu_()


def patch_rows(maps: Sequence[Tensor], embedding: str, target_dim: int = 1024) -> Tensor:
    """The (B*H*W, d) patch matrix of the maps' embedding (the reference's, row order (b, y, x))."""
    return patch_matrix(embed_patches(list(maps), embedding, target_dim)).contiguous()


# ---- the head case --------------------------------------------------------------------------------
@dataclass
class HeadCase:
    """Everything the head paths share: query maps, their patches, the training bank and the fitted scorer.

    ``matrix`` / ``offset`` are the scorer's full-rank M_pre and mu in float32, as the deployed head
    (``CRDHead``) holds them; every CRD path gets these same tensors.
    """

    embedding: str
    n_train_images: int
    maps: list[Tensor]
    patches: Tensor
    bank: Tensor
    scorer: CRDScorer
    matrix: Tensor
    offset: Tensor
    target_dim: int = 1024

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    @property
    def n_query_images(self) -> int:
        return int(self.maps[0].shape[0])


def make_head_case(embedding: str = "concat", n_train: int = 200, n_query: int = 8, seed: int = 0,
                   batch: int = 20, generator: Optional[FeatureGenerator] = None,
                   target_dim: int = 1024) -> HeadCase:
    """Training bank + fitted CRD scorer from ``n_train`` random images, and ``n_query`` query images.

    The training maps are embedded batch by batch into one float32 bank (what an NN detector stores)
    and streamed into ``CRDScorer.partial_fit`` (what CRD keeps: the d x d statistics).
    """
    check_embedding(embedding)
    if n_train < 1 or n_query < 1 or batch < 1:
        raise ValueError(f"n_train, n_query and batch must be positive, got {n_train}, {n_query}, {batch}")
    gen = generator or FeatureGenerator(seed=seed)
    d = embedding_dim(gen.channels, embedding, target_dim)
    bank = torch.empty(n_train * gen.patches_per_image, d, dtype=torch.float32)
    scorer = CRDScorer()
    row = 0
    for maps in gen.batches(n_train, batch):
        rows = patch_rows(maps, embedding, target_dim)
        bank[row : row + rows.shape[0]] = rows
        row += rows.shape[0]
        scorer.partial_fit(rows)
    query = gen.maps(n_query, index=10_000_000)  # far from every training batch's seed
    proj = scorer.projection
    return HeadCase(embedding, n_train, query, patch_rows(query, embedding, target_dim), bank, scorer,
                    proj.matrix.float().contiguous(), proj.offset.float().contiguous(), target_dim)


def fused_path(case: HeadCase) -> Callable[[], Tensor]:
    """The fused op: feature maps -> (B, 28, 28) float32 scores, never building the embedding."""
    from ..ops import head_op as ops

    maps, matrix, offset = case.maps, case.matrix, case.offset
    return lambda: ops.crd_head(maps, matrix, offset, case.embedding, case.target_dim)


def reference_path(case: HeadCase) -> Callable[[], Tensor]:
    """The unfused reference in float32: pool, resize, concat (reduce), project every patch, norm."""
    maps, matrix, offset = case.maps, case.matrix, case.offset
    return lambda: reference.crd_head(maps, matrix, offset, case.embedding, case.target_dim, dtype=torch.float32)


def nn_scorer(case: HeadCase, fraction: float, backend: str) -> NNScorer:
    """An exact 1-NN scorer over a seeded random ``fraction`` of the training bank, index built."""
    scorer = NNScorer(subsample=None if fraction >= 1.0 else fraction, backend=backend, seed=0).fit(case.bank)
    scorer.score(case.patches[:1])  # builds the faiss index / caches the torch bank norms outside any timing
    return scorer


def nn_path(case: HeadCase, scorer: NNScorer) -> Callable[[], Tensor]:
    """The NN head: the same maps embedded (as the reference does) then searched; scores as (B, H, W)."""
    maps, b, (h, w) = case.maps, case.n_query_images, tuple(case.maps[0].shape[-2:])
    return lambda: scorer.score(patch_rows(maps, case.embedding, case.target_dim)).reshape(b, h, w)


def head_key(embedding: str, path: str) -> str:
    """Result key of a head path: ``head/<embedding>/<path>``, path e.g. "fused" or "nn-faiss-100%"."""
    return f"head/{embedding}/{path}"


def nn_name(backend: str, fraction: float) -> str:
    return f"nn-{backend}-{fraction * 100:g}%"


def max_relative_error(scores: Tensor, ref: Tensor) -> float:
    """max |scores - ref| / |ref| over all entries (ref entries of 0 compare by absolute error)."""
    a, b = scores.double(), ref.double()
    return float(((a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float64).tiny)).max())


# ---- the end-to-end case --------------------------------------------------------------------------
@dataclass
class EndToEndCase:
    """A fitted detector's ``InferenceModel``, a normalised image batch and its feature maps."""

    backbone: str
    crop: int
    model: torch.nn.Module
    x: Tensor
    features: list[Tensor]

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


def make_e2e_case(backbone: str = "wide_resnet50_2", crop: int = 224, batch: int = 8, n_fit: int = 8,
                  seed: int = 0) -> EndToEndCase:
    """A CRDDetector with seeded random weights fitted on ``n_fit`` random images; its inference model.

    Throughput does not depend on the weights' values, so random weights time the real network.
    """
    from ..detector.detector import CRDDetector

    gen = torch.Generator().manual_seed(seed)
    det = CRDDetector(backbone=backbone, weights="random", resize=crop, crop=crop, batch_size=batch, seed=seed)
    det.fit(torch.rand(max(n_fit, 2), 3, crop, crop, generator=gen), progress=False)
    model = det.inference_model()
    x = det.preprocess.batch(torch.rand(batch, 3, crop, crop, generator=gen)).contiguous()
    with torch.inference_mode():
        features = [f.clone() for f in model.extractor(x)]
    return EndToEndCase(backbone, crop, model, x, features)


def e2e_paths(case: EndToEndCase) -> dict[str, Callable[[], Any]]:
    """"backbone" (feature maps only), "head" (the model's CRD head on those maps), "full" (the whole model)."""
    model, x, features = case.model, case.x, case.features

    def inference(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return fn()
        return run

    return {
        "backbone": inference(lambda: model.extractor(x)),
        "head": inference(lambda: model.head(features)),
        "full": inference(lambda: model(x)),
    }


# ---- fitting ---------------------------------------------------------------------------------------
def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process image. Not ru_maxrss: Linux
    carries ru_maxrss over fork + exec, so a child started by a big parent (a pytest run holding a 1 GB
    bank) would report the parent's size. Elsewhere: ru_maxrss (KB on Linux/BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024.0


def fit_run(n_images: int, dim: int = 1536, batch: int = 8, patches_per_image: int = 784, seed: int = 0) -> dict[str, Any]:
    """Stream ``n_images`` images of random patches through ``CRDScorer.partial_fit``, in this process.

    Only the partial_fit calls are timed (not the random generation); the one d x d solve that turns
    the statistics into M_pre is timed apart (``solve_s``). Returns patches/s, the seconds,
    the peak RSS before the first call and at the end (MB), and the bytes an NN bank of the same patches
    would hold, for contrast.
    """
    if n_images < 1 or batch < 1:
        raise ValueError(f"n_images and batch must be positive, got {n_images}, {batch}")
    scorer = CRDScorer()
    first = random_patches(batch * patches_per_image, dim, seed=seed)  # allocate the batch-sized buffers once
    rss_before = _rss_mb()
    seconds = 0.0
    for i, start in enumerate(range(0, n_images, batch)):
        rows = first if i == 0 else random_patches(min(batch, n_images - start) * patches_per_image, dim, seed=seed + i)
        rows = rows[: min(batch, n_images - start) * patches_per_image]
        t0 = time.perf_counter()
        scorer.partial_fit(rows)
        seconds += time.perf_counter() - t0
        del rows
    t0 = time.perf_counter()
    scorer.projection  # noqa: B018 - the d x d solve (eigendecomposition): a fixed cost, timed apart
    solve = time.perf_counter() - t0
    n_patches = n_images * patches_per_image
    return {
        "n_images": n_images,
        "n_patches": n_patches,
        "dim": dim,
        "seconds": seconds,
        "patches_per_s": n_patches / seconds,
        "solve_s": solve,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _rss_mb(),
        "nn_bank_mb": n_patches * dim * 4 / 1e6,
        "crd_state_mb": (2 * dim * dim + 2 * dim) * 8 / 1e6,
    }


def fit_in_subprocess(n_images: int, dim: int = 1536, batch: int = 8, seed: int = 0, timeout: float = 1800.0,
                      threads: Optional[int] = None) -> dict[str, Any]:
    """``fit_run`` in a fresh Python process, so its peak memory is its own (not the caller's)."""
    cmd = [sys.executable, "-m", "crd_fast.benchmark.suite", "fit", str(n_images), str(dim), str(batch), str(seed)]
    env = dict(os.environ)
    if threads is not None:
        env["CRD_BENCH_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fit benchmark child failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- timing -----------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall-clock seconds of each timed call. ``best`` (the minimum) is the least disturbed by other jobs;
    ``median`` shows how much they disturbed it."""

    times: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def rounds(self) -> int:
        return len(self.times)


def time_call(fn: Callable[[], Any], rounds: int = 5, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``rounds`` times timed."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    for _ in range(warmup):
        fn()
    out = Timing()
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.times.append(time.perf_counter() - t0)
    return out


class RoundRobin:
    """Calling it runs every path once, in turn, timing each: one round of an interleaved comparison.

    On a shared machine the load changes over a run; paths timed round-robin see the same changes, so
    their ratio is fairer than that of paths timed one block after another. ``timings`` holds the rounds.
    """

    def __init__(self, fns: dict[str, Callable[[], Any]]) -> None:
        if not fns:
            raise ValueError("at least one path is needed")
        self.fns = dict(fns)
        self.timings = {name: Timing() for name in self.fns}

    def __call__(self) -> None:
        for name, fn in self.fns.items():
            t0 = time.perf_counter()
            fn()
            self.timings[name].times.append(time.perf_counter() - t0)

    def reset(self) -> None:
        """Forget the rounds so far (e.g. the warm-up)."""
        self.timings = {name: Timing() for name in self.fns}


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time several paths round-robin (a, b, c, a, b, c, ...); see ``RoundRobin``."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    rr = RoundRobin(fns)
    for _ in range(warmup):
        rr()
    rr.reset()
    for _ in range(rounds):
        rr()
    return rr.timings


# ---- the ratio table --------------------------------------------------------------------------------
#: The NN bank of the NN target: 100% of the patches of 200 training images of 784 patches.
TARGET_BANK_PATCHES = 200 * 784


@dataclass
class Target:
    """One target of issue 4: the measured value from best times (None: not measured), the same ratio
    from median times, the bound, and a caveat."""

    name: str
    value: Optional[float]
    threshold: float
    higher_is_better: bool = True
    note: str = ""
    median_value: Optional[float] = None
    comparable: bool = True  # False: measured at other sizes than the target's (a quick run)

    @property
    def met(self) -> Optional[bool]:
        if self.value is None or not self.comparable:
            return None
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def _show(self, v: float) -> str:
        return f"{v * 100:.1f}%" if not self.higher_is_better else f"{v:.1f}x"

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        goal = f"{self.threshold * 100:g}%" if not self.higher_is_better else f"{self.threshold:g}x"
        if self.value is None:
            return f"  [not measured] {self.name} (target {sign} {goal})"
        median = f", {self._show(self.median_value)} from medians" if self.median_value is not None else ""
        note = f" [{self.note}]" if self.note else ""
        verdict = "not comparable" if not self.comparable else ("met" if self.met else "MISSED")
        return f"  [{verdict}] {self.name}: {self._show(self.value)}{median} (target {sign} {goal}){note}"


Results = dict[str, Timing]


def fastest_nn(results: Results, embedding: str, fraction: float) -> Optional[tuple[str, Timing]]:
    """(backend, timing) of the faster (by best time) exact NN search measured for this bank."""
    found = [(b, results[head_key(embedding, nn_name(b, fraction))]) for b in ("faiss", "torch")
             if head_key(embedding, nn_name(b, fraction)) in results]
    return min(found, key=lambda t: t[1].best) if found else None


def _ratio(num: Optional[Timing], den: Optional[Timing]) -> tuple[Optional[float], Optional[float]]:
    if num is None or den is None:
        return None, None
    return num.best / den.best, num.median / den.median


def targets(results: Results, extra: Optional[dict[str, Any]] = None) -> list[Target]:
    """Issue 4's CPU targets from the timings keyed as the benchmarks key them (``extra``: run sizes)."""
    extra = extra or {}
    fused = results.get(head_key("concat", "fused"))
    nn = fastest_nn(results, "concat", 1.0)
    sizes = extra.get("head_sizes", {}).get("concat")
    bank_note = ""
    if sizes and sizes[1] != TARGET_BANK_PATCHES:
        bank_note = f"bank of {sizes[1]:,} patches, the target is defined for {TARGET_BANK_PATCHES:,}"
    e2e = extra.get("e2e", {})
    e2e_note = "" if e2e.get("backbone", "wide_resnet50_2") == "wide_resnet50_2" and e2e.get("batch", 8) == 8 \
        else f"{e2e.get('backbone')} batch {e2e.get('batch')}, the target is for wide_resnet50_2 batch 8"
    err = extra.get("errors", {}).get("concat")
    err_note = "" if err is None else (f"scores within {err:.1e} relative" + ("" if err <= SCORE_RTOL else " - TOO FAR"))
    speedup = _ratio(results.get(head_key("concat", "reference")), fused)
    nn_speedup = _ratio(nn[1] if nn else None, fused)
    share = _ratio(results.get("e2e/head"), results.get("e2e/full"))
    return [
        Target("fused CPU head vs float32 reference path (d=1536)", speedup[0], TARGET_FUSED_SPEEDUP,
               note=err_note, median_value=speedup[1]),
        Target(f"CRD head (fused, full rank) vs fastest exact NN ({nn[0] if nn else '-'}), 100% bank (d=1536)",
               nn_speedup[0], TARGET_NN_SPEEDUP, note=bank_note, median_value=nn_speedup[1],
               comparable=not bank_note),
        Target("CRD head share of end-to-end time", share[0], TARGET_HEAD_SHARE, higher_is_better=False,
               note=e2e_note, median_value=share[1], comparable=not e2e_note),
    ]


def format_table(results: Results, info: Optional[dict[str, Any]] = None,
                 extra: Optional[dict[str, Any]] = None) -> str:
    """The ratio table: head paths vs the fused head, end-to-end shares, fit scaling, targets.

    ``results`` maps keys (``head/<embedding>/<path>``, ``e2e/<path>``) to ``Timing``s;
    ``extra`` may hold "config" (a line describing the sizes), "head_sizes" ({embedding: (n_query_images,
    n_bank_patches, d)}), "e2e" (dict with backbone, crop, batch), "fit" (list of ``fit_run`` dicts) and
    "errors" ({embedding: max relative difference of fused vs reference scores}).
    """
    extra = extra or {}
    lines: list[str] = []
    if info:
        lines.append("machine: " + describe_machine(info))
    if extra.get("config"):
        lines.append("sizes: " + extra["config"])
    for emb in EMBEDDINGS:
        fused = results.get(head_key(emb, "fused"))
        if fused is None:
            continue
        sizes = extra.get("head_sizes", {}).get(emb)
        what = f" d={sizes[2]}, {sizes[0]} query images, NN bank of {sizes[1]:,} patches at 100%" if sizes else ""
        lines.append("")
        lines.append(f"CRD head, {emb} embedding,{what}")
        lines.append(f"  {'path':<18}{'best ms':>10}{'median ms':>11}{'rounds':>7}{'x fused (best)':>16}{'(median)':>10}")
        paths = ["fused", "reference"] + [nn_name(b, f) for f in BANK_FRACTIONS for b in ("faiss", "torch")]
        for path in paths:
            t = results.get(head_key(emb, path))
            if t is not None:
                lines.append(f"  {path:<18}{t.best * 1e3:10.1f}{t.median * 1e3:11.1f}{t.rounds:7d}"
                             f"{t.best / fused.best:16.1f}{t.median / fused.median:10.1f}")
        err = extra.get("errors", {}).get(emb)
        if err is not None:
            lines.append(f"  fused vs reference scores: max relative difference {err:.2e} (tolerance {SCORE_RTOL:g})")
    full = results.get("e2e/full")
    if full is not None:
        e2e = extra.get("e2e", {})
        batch = e2e.get("batch", 1)
        lines.append("")
        lines.append(f"End to end: {e2e.get('backbone', '?')} (random weights), {e2e.get('crop', '?')} px, batch {batch}, "
                     "paths timed round-robin")
        lines.append(f"  {'path':<18}{'images/s (best)':>16}{'(median)':>10}{'share of full (best)':>22}{'(median)':>10}")
        for name in ("backbone", "head", "full"):
            t = results.get(f"e2e/{name}")
            if t is not None:
                lines.append(f"  {name:<18}{batch / t.best:16.2f}{batch / t.median:10.2f}"
                             f"{t.best / full.best * 100:21.1f}%{t.median / full.median * 100:9.1f}%")
        backbone = results.get("e2e/backbone")
        if backbone is not None:
            lines.append(f"  after the backbone (head + anomaly map + max): {(full.best - backbone.best) / full.best * 100:.1f}% "
                         f"of full (best), {(full.median - backbone.median) / full.median * 100:.1f}% (median)")
    fits = extra.get("fit")
    if fits:
        lines.append("")
        lines.append(f"Fit (CRDScorer.partial_fit, d={fits[0]['dim']}, one process per size; peak RSS = VmHWM)")
        lines.append(f"  {'images':>7}{'patches':>11}{'patches/s':>12}{'solve s':>9}{'peak RSS MB':>13}"
                     f"{'fit adds MB':>13}{'NN bank MB':>12}")
        for f in fits:
            lines.append(f"  {f['n_images']:>7}{f['n_patches']:>11,}{f['patches_per_s']:>12,.0f}{f.get('solve_s', float('nan')):>9.1f}"
                         f"{f['peak_rss_mb']:>13.0f}{f['peak_rss_mb'] - f['rss_before_mb']:>13.0f}{f['nn_bank_mb']:>12.0f}")
    lines.append("")
    lines.append("Targets (ratios of best-of-rounds times measured in this run; the same from medians):")
    lines.extend(t.line() for t in targets(results, extra))
    return "\n".join(lines)


# ---- one whole run (the CLI) --------------------------------------------------------------------------
PARTS: tuple[str, ...] = ("head", "e2e", "fit")


@dataclass
class BenchConfig:
    """Sizes of one run (the CLI's and bench/'s); ``quick()`` gives a run of two minutes or so on 2 cores.

    ``nn_rounds`` holds the rounds per bank fraction: exact NN over the 100% bank takes about a minute
    per call on 2 cores, so it gets fewer.
    """

    n_train: int = 200
    n_query: int = 8
    embeddings: tuple[str, ...] = EMBEDDINGS
    fractions: tuple[float, ...] = BANK_FRACTIONS
    backends: tuple[str, ...] = ("faiss", "torch")
    rounds: int = 10
    nn_rounds: tuple[int, ...] = (5, 3, 2)
    e2e_backbone: str = "wide_resnet50_2"
    e2e_crop: int = 224
    e2e_batch: int = 8
    e2e_rounds: int = 5
    fit_sizes: tuple[int, ...] = (50, 200, 1000)
    fit_dim: int = 1536
    parts: tuple[str, ...] = PARTS
    quick_run: bool = False
    layers: tuple[tuple[int, int, int], ...] = WRN50_LAYERS
    target_dim: int = 1024

    @classmethod
    def quick(cls, **changes: Any) -> "BenchConfig":
        base = dict(n_train=20, embeddings=("concat",), rounds=3, nn_rounds=(3, 2, 1), e2e_batch=2,
                    e2e_rounds=2, fit_sizes=(4, 16), quick_run=True)
        base.update(changes)
        return cls(**base)

    @classmethod
    def from_env(cls) -> "BenchConfig":
        """``quick()`` when CRD_BENCH_QUICK is set (not "" or "0"), else the full sizes."""
        quick = os.environ.get("CRD_BENCH_QUICK", "") not in ("", "0")
        return cls.quick() if quick else cls()

    def rounds_for(self, fraction: float) -> int:
        """Timed rounds of the NN search over the ``fraction`` bank."""
        return self.nn_rounds[self.fractions.index(fraction)] if fraction in self.fractions else 1

    def describe(self) -> str:
        return (f"{'QUICK run (smaller than the issue-4 sizes), ' if self.quick_run else ''}"
                f"head: {self.n_train} training images x {self.layers[0][1] * self.layers[0][2]} patches "
                f"(maps {' + '.join('x'.join(str(v) for v in l) for l in self.layers)}), {self.n_query} query images, "
                f"embeddings {', '.join(self.embeddings)}, banks {', '.join(f'{f * 100:g}%' for f in self.fractions)}; "
                f"e2e: {self.e2e_backbone} {self.e2e_crop} px batch {self.e2e_batch}; "
                f"fit: {', '.join(str(n) for n in self.fit_sizes)} images at d={self.fit_dim}")


def run_all(config: BenchConfig, log: Callable[[str], None] = lambda s: None) -> tuple[Results, dict[str, Any]]:
    """Run every comparison of ``config``; returns (timings by key, extra) for ``format_table``."""
    unknown = sorted(set(config.parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown benchmark part(s) {unknown}; choose from {PARTS}")
    try:
        import faiss  # noqa: F401
        backends = config.backends
    except ImportError:
        log("faiss is not installed: exact NN search is timed with the torch backend only")
        backends = tuple(b for b in config.backends if b != "faiss")
    results: Results = {}
    extra: dict[str, Any] = {"config": config.describe(), "head_sizes": {}, "errors": {}}
    for emb in config.embeddings if "head" in config.parts else ():
        log(f"head ({emb}): {config.n_train} training images of random features -> bank and CRD fit")
        case = make_head_case(emb, n_train=config.n_train, n_query=config.n_query,
                              generator=FeatureGenerator(layers=config.layers), target_dim=config.target_dim)
        extra["head_sizes"][emb] = (case.n_query_images, int(case.bank.shape[0]), case.dim)
        fused, ref = fused_path(case), reference_path(case)
        extra["errors"][emb] = max_relative_error(fused(), ref())
        log(f"head ({emb}): fused op and float32 reference, {config.rounds} rounds each, interleaved")
        for name, timing in time_interleaved({"fused": fused, "reference": ref}, config.rounds).items():
            results[head_key(emb, name)] = timing
        for fraction in config.fractions:
            for backend in backends:
                rounds = config.rounds_for(fraction)
                log(f"head ({emb}): exact NN search, {backend}, {fraction * 100:g}% bank, {rounds} round(s)")
                scorer = nn_scorer(case, fraction, backend)
                results[head_key(emb, nn_name(backend, fraction))] = time_call(nn_path(case, scorer), rounds, warmup=0)
                del scorer
        del case
    if "e2e" in config.parts:
        log(f"end to end: {config.e2e_backbone} (random weights), {config.e2e_crop} px, batch {config.e2e_batch}")
        e2e = make_e2e_case(config.e2e_backbone, config.e2e_crop, config.e2e_batch)
        extra["e2e"] = {"backbone": e2e.backbone, "crop": e2e.crop, "batch": e2e.batch}
        for name, timing in time_interleaved(e2e_paths(e2e), config.e2e_rounds).items():
            results[f"e2e/{name}"] = timing
        del e2e
    if "fit" in config.parts:
        extra["fit"] = []
        for n in config.fit_sizes:
            log(f"fit: {n} images streamed through CRDScorer.partial_fit in a child process")
            extra["fit"].append(fit_in_subprocess(n, config.fit_dim))
    return results, extra


def _fit_child(argv: Sequence[str]) -> None:
    threads = os.environ.get("CRD_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    n_images, dim, batch, seed = (int(a) for a in argv)
    print(json.dumps(fit_run(n_images, dim, batch, seed=seed)))


if __name__ == "__main__":  # the child process of fit_in_subprocess
    if len(sys.argv) == 6 and sys.argv[1] == "fit":
        _fit_child(sys.argv[2:])
    else:
        sys.exit("usage: python -m crd_fast.benchmark.suite fit N_IMAGES DIM BATCH SEED")
