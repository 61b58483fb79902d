"""Distributed fitting of a CRDDetector (called by ``fit_distributed`` for detectors).

Each rank runs the detector's own ``partial_fit`` on its shard into a fresh scorer, so the patches
are embedded exactly as in a single-process fit; the statistics are then combined exactly
(``all_reduce_statistics``). The detector also keeps a fixed-size random sample of training inputs
for its training score statistics (its ``reservoir``). Which positions of the input stream end up in
that sample depends only on the seed and the number of images, not on their content, so every rank
extends a copy of the reservoir by positions alone (``Reservoir.extend_lazily``), the ranks that own the
chosen images send just those (at most ``SCORE_SAMPLE`` inputs in all), and every rank ends with the very
sample -- and so the very training score statistics -- a single-process fit on the same ordered list
would have. Only the detector's public API is used (``reset``, ``reservoir``, ``install_fit``).

A detector with the local (position-aware) model fits a LocalCRDScorer per rank instead; the ranks exchange
their scorers (per-position means and Frequent Directions sketches, P x 2 sketch x d floats each) and every
rank merges them in rank order, so all ranks hold the same model. The label-free choice (lam_rel or spatial
"auto" not decided yet) needs the held-out images on one process and is refused here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.stats import PatchStatistics
from ..detector.selection import MIN_IMAGES
from ..io.model_file import PathLike
from ..scorers.crd import CRDScorer
from .reduce import all_gather_objects, raise_if_any_failed, rank_and_world
from .sharding import shard
from .steps import copy_statistics, fit_shards, save_on_rank0


def _normalised_inputs(detector: Any, items: Sequence[Any]) -> list[torch.Tensor]:
    """The normalised CPU input tensors of ``items``, as the detector's fit would store them."""
    out: list[torch.Tensor] = []
    for _, x in detector.iter_batches(list(items)):
        out.extend(img.detach().to("cpu", copy=True) for img in x)
    return out


def _gather_sample_inputs(
    detector: Any, items: Sequence[Any], indices: Sequence[int], group: Optional[dist.ProcessGroup]
) -> Any:
    """``fetch`` for ``Reservoir.extend_lazily``: each rank prepares the chosen inputs it owns, all receive all.

    A collective (every rank calls it once); a failure on any rank raises on every rank.
    """
    owned = set(indices)

    def fetch(positions: list[int]) -> Mapping[int, torch.Tensor]:
        wanted = [p for p in positions if p in owned]
        error, payload = None, None
        try:
            payload = dict(zip(wanted, _normalised_inputs(detector, [items[p] for p in wanted])))
        except Exception as exc:
            error = exc
        gathered = all_gather_objects((error is None, payload), group)
        raise_if_any_failed(gathered, "preparing the training-score sample", error)
        inputs: dict[int, torch.Tensor] = {}
        for _, part in gathered:
            inputs.update(part)
        return inputs

    return fetch


def fit_detector_distributed(
    detector: Any,
    items: Sequence[Any],
    *,
    update: bool = False,
    save_path: Optional[PathLike] = None,
    group: Optional[dist.ProcessGroup] = None,
    shard_mode: str = "strided",
    progress: bool = False,
) -> Any:
    """See ``fit_distributed``: the same contract for a CRDDetector whose items are images (a list)."""
    rank, _ = rank_and_world(group)
    if not update:  # what CRDDetector.fit does before streaming
        detector.set_threshold(None)
        detector.reset()
    if detector.selection_pending and not detector.is_fitted and len(items) < MIN_IMAGES:
        detector.settle_without_selection(len(items))  # what a single-process fit of so few images does
    if detector.selection_pending:  # every rank has the same options: every rank raises this before any work
        raise ValueError(
            "distributed fitting needs the spatial model and lam_rel fixed (e.g. lam_rel=0.01, spatial='global' or "
            f"'local'), or an update of a fitted model; got lam_rel={detector.options.lam_rel!r}, "
            f"spatial={detector.options.spatial!r}: the label-free choice ('auto') needs a single-process fit"
        )
    if detector.spatial_choice == "local":
        _fit_local(detector, items, group, shard_mode, progress and rank == 0)
        if save_path is not None:
            save_on_rank0(lambda: detector.save(save_path), group, f"writing {save_path}")
        return detector
    params = dict(lam_rel=detector.scorer.lam_rel, center=detector.scorer.center, rank=detector.scorer.rank)
    old_stats = copy_statistics(detector.scorer.statistics) if detector.scorer.is_fitted else None
    old_n_images = detector.n_images
    sample = detector.reservoir.copy()  # the sample before this fit: extended below by positions alone

    def fit_shard(_: list[int], mine: list[Any]) -> Optional[PatchStatistics]:
        if not mine:
            return None
        detector.scorer = CRDScorer(**params)
        detector.partial_fit(mine, progress=progress and rank == 0)
        return detector.scorer.statistics

    indices, new = fit_shards(items, group, shard_mode, "fitting their shard of images", fit_shard)
    sample.extend_lazily(len(items), _gather_sample_inputs(detector, items, indices, group))
    merged = old_stats.merge(new) if old_stats is not None else new
    detector.install_fit(CRDScorer.from_statistics(merged, **params), old_n_images + len(items), sample)
    if save_path is not None:
        save_on_rank0(lambda: detector.save(save_path), group, f"writing {save_path}")
    return detector


def _fit_local(
    detector: Any, items: Sequence[Any], group: Optional[dist.ProcessGroup], shard_mode: str, progress: bool
) -> None:
    """Each rank fits a LocalCRDScorer on its shard; all gather them and merge them (and any earlier fit) in rank
    order; the training-score sample is built as for the global model. A collective."""
    rank, world = rank_and_world(group)
    old = detector.local_scorer if detector.is_fitted else None
    template = detector.local_scorer
    old_n_images = detector.n_images
    sample = detector.reservoir.copy()
    error: Optional[BaseException] = None
    payload, indices = None, []
    try:
        indices, mine = shard(items, rank, world, shard_mode)
        if mine:
            detector.local_scorer = template.__class__(
                template.lam_rel, template.shrinkage, template.rank, template.sketch
            )
            detector.partial_fit(mine, progress=progress)
            payload = detector.local_scorer
    except Exception as exc:  # reported to every rank, so none waits in a collective
        error = exc
    gathered = all_gather_objects((error is None, payload), group)
    raise_if_any_failed(gathered, "fitting their shard of images (local model)", error)
    merged = template.__class__(template.lam_rel, template.shrinkage, template.rank, template.sketch)
    for part in ([old] if old is not None else []) + [p for _, p in gathered if p is not None]:
        merged.merge(part)
    sample.extend_lazily(len(items), _gather_sample_inputs(detector, items, indices, group))
    detector.install_local_fit(merged, old_n_images + len(items), sample)
