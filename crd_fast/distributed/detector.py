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
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.stats import PatchStatistics
from ..io.model_file import PathLike
from ..scorers.crd import CRDScorer
from .reduce import all_gather_objects, raise_if_any_failed, rank_and_world
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
    if detector.selection_pending or detector.spatial_choice != "global":
        # every rank has the same options, so every rank raises this before any work
        raise ValueError(
            "distributed fitting supports the global CRD with a fixed lam_rel (e.g. lam_rel=0.01, spatial='global'), "
            "or updates of a model fitted that way or with the choice made; got "
            f"lam_rel={detector.options.lam_rel!r}, spatial={detector.options.spatial!r} "
            f"(spatial model in use: {detector.spatial_choice or 'not chosen yet'}): the label-free choice "
            "(lam_rel/spatial 'auto') and the local model need a single-process fit"
        )
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
