"""One whole benchmark run (``crd-fast bench``): every part of a ``BenchConfig``, timed, for ``format_table``."""

from __future__ import annotations

from typing import Any, Callable

from .config import PARTS, BenchConfig
from .fit import fit_in_subprocess
from .inputs import FeatureGenerator
from .paths import (
    e2e_paths,
    fused_path,
    make_e2e_case,
    make_head_case,
    max_relative_error,
    nn_path,
    nn_scorer,
    reference_path,
)
from .table import Results, head_key, nn_name
from .timing import time_call, time_interleaved


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
        case = make_head_case(
            emb,
            n_train=config.n_train,
            n_query=config.n_query,
            generator=FeatureGenerator(layers=config.layers),
            target_dim=config.target_dim,
        )
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
