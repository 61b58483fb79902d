"""Distributed fitting of a CRDDetector (called by ``fit_distributed`` for detectors).

Each rank runs the detector's own ``partial_fit`` on its shard into a fresh copy of its scoring model
(``ScoringModel.fresh``), so the patches are embedded exactly as in a single-process fit; the ranks then combine
their fits. A model whose fit is float64 statistics that add exactly (the global CRD: :class:`SummableStatistics`)
is combined by ``all_reduce_statistics`` (two all_reduce calls of d x d, whatever the data); any other model is
gathered from every rank and merged in rank order (``ScoringModel.merge``; the local CRD's Frequent Directions
sketches, P x 2 sketch x d floats each), so every rank holds the same model. The detector also keeps a fixed-size
random sample of training inputs for its training score statistics (its ``reservoir``). Which positions of the
input stream end up in that sample depends only on the seed and the number of images, not on their content, so
every rank extends a copy of the reservoir by positions alone (``Reservoir.extend_lazily``), the ranks that own
the chosen images send just those (at most ``SCORE_SAMPLE`` inputs in all), and every rank ends with the very
sample -- and so the very training score statistics -- a single-process fit on the same ordered list would have.
Only the detector's public API is used (``reset``, ``reservoir``, ``model``, ``install_fit``). The label-free
choice (lam_rel or spatial "auto" not decided yet) needs the held-out images on one process and is refused here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.distributed as dist

from ..core.stats import PatchStatistics
from ..detector.detector import CRDDetector
from ..io.model_file import PathLike
from ..scoring.base import ScoringModel
from ..selection.plan import MIN_IMAGES
from .reduce import all_gather_objects, raise_if_any_failed, rank_and_world
from .sharding import shard
from .steps import copy_statistics, fit_shards, save_on_rank0


@runtime_checkable
class SummableStatistics(Protocol):
    """A scoring model whose fit is float64 statistics that add exactly across processes (the global CRD)."""

    def current_statistics(self) -> PatchStatistics: ...

    def replace_statistics(self, stats: PatchStatistics) -> None: ...


def _normalised_inputs(detector: CRDDetector, items: Sequence[Any]) -> list[torch.Tensor]:
    """The normalised CPU input tensors of ``items``, as the detector's fit would store them."""
    out: list[torch.Tensor] = []
    for _, x in detector.iter_batches(list(items)):
        out.extend(img.detach().to("cpu", copy=True) for img in x)
    return out


def _gather_sample_inputs(
    detector: CRDDetector, items: Sequence[Any], indices: Sequence[int], group: Optional[dist.ProcessGroup]
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
    detector: CRDDetector,
    items: Sequence[Any],
    *,
    update: bool = False,
    save_path: Optional[PathLike] = None,
    group: Optional[dist.ProcessGroup] = None,
    shard_mode: str = "strided",
    progress: bool = False,
) -> CRDDetector:
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
    template = detector.model
    old = template if detector.is_fitted else None
    old_n_images = detector.n_images
    sample = detector.reservoir.copy()  # the sample before this fit: extended below by positions alone
    show = progress and rank == 0
    if isinstance(template, SummableStatistics):
        indices, merged = _reduce_statistics(detector, template, old, items, group, shard_mode, show)
    else:
        indices, merged = _gather_and_merge(detector, template, old, items, group, shard_mode, show)
    sample.extend_lazily(len(items), _gather_sample_inputs(detector, items, indices, group))
    detector.install_fit(merged, old_n_images + len(items), sample)
    if save_path is not None:
        save_on_rank0(lambda: detector.save(save_path), group, f"writing {save_path}")
    return detector


def _reduce_statistics(
    detector: CRDDetector,
    template: ScoringModel,
    old: Optional[ScoringModel],
    items: Sequence[Any],
    group: Optional[dist.ProcessGroup],
    shard_mode: str,
    progress: bool,
) -> tuple[list[int], ScoringModel]:
    """Each rank fits its shard; the statistics of all ranks (and any earlier fit) are added exactly."""
    old_stats = copy_statistics(old.current_statistics()) if old is not None else None

    def fit_shard(_: list[int], mine: list[Any]) -> Optional[PatchStatistics]:
        if not mine:
            return None
        detector.model = template.fresh()
        detector.partial_fit(mine, progress=progress)
        return detector.model.current_statistics()

    indices, new = fit_shards(items, group, shard_mode, "fitting their shard of images", fit_shard)
    merged = template.fresh()
    merged.replace_statistics(old_stats.merge(new) if old_stats is not None else new)
    return indices, merged


def _gather_and_merge(
    detector: CRDDetector,
    template: ScoringModel,
    old: Optional[ScoringModel],
    items: Sequence[Any],
    group: Optional[dist.ProcessGroup],
    shard_mode: str,
    progress: bool,
) -> tuple[list[int], ScoringModel]:
    """Each rank fits its shard; all gather every rank's model and merge them (after any earlier fit) in rank
    order, so every rank holds the same model. A collective."""
    rank, world = rank_and_world(group)
    error: Optional[BaseException] = None
    payload, indices = None, []
    try:
        indices, mine = shard(items, rank, world, shard_mode)
        if mine:
            detector.model = template.fresh()
            detector.partial_fit(mine, progress=progress)
            payload = detector.model
    except Exception as exc:  # reported to every rank, so none waits in a collective
        error = exc
    gathered = all_gather_objects((error is None, payload), group)
    raise_if_any_failed(gathered, f"fitting their shard of images ({template.name} model)", error)
    merged = template.fresh()
    for part in ([old] if old is not None else []) + [p for _, p in gathered if p is not None]:
        merged.merge(part)
    return indices, merged
