"""Distributed fitting of a CRDDetector (called by ``fit_distributed`` for detectors).

Each rank runs the detector's own ``partial_fit`` on its shard into a fresh scorer, so the patches
are embedded exactly as in a single-process fit; the statistics are then combined exactly
(``all_reduce_statistics``). The detector also keeps a fixed-size random sample of training inputs
for its training score statistics (reservoir sampling, seeded). Which positions of the input stream
end up in that sample depends only on the seed and the number of images, not on their content, so
every rank replays the reservoir on positions alone, the ranks that own the chosen images send just
those (at most ``SCORE_SAMPLE`` inputs in all), and every rank ends with the very sample -- and so the
very training score statistics -- a single-process fit on the same ordered list would have.

This module relies on CRDDetector's fitting state (``_reset_fit``, ``_sample``, ``_sample_seen``,
``_sample_rng``, ``_stats_stale``, ``n_images``); tests/test_distributed.py checks the result against
a single-process fit, so a change there shows up as a failing test, not a silent difference.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.stats import PatchStatistics
from ..io.model_file import PathLike
from ..scorers.crd import CRDScorer
from .fit import _copy, _scorer_statistics, fit_shards, install_statistics, save_on_rank0
from .reduce import all_gather_objects, raise_if_any_failed, rank_and_world


def as_item_list(items: Any) -> Sequence[Any]:
    """A folder becomes its sorted image files; a (B, 3, H, W) tensor its B images; sequences stay."""
    if isinstance(items, (str, os.PathLike)):
        from ..data.images import list_image_files

        if os.path.isdir(items):
            return list_image_files(items)
        return [os.fspath(items)]
    if isinstance(items, torch.Tensor):
        return list(items.unsqueeze(0) if items.ndim == 3 else items)
    return items


def replay_reservoir(
    rng: random.Random, seen: int, kept: int, n_new: int, capacity: int
) -> tuple[list[Optional[int]], int]:
    """Replay Algorithm R over ``n_new`` new stream positions.

    ``kept`` slots are already filled (by earlier images: ``None`` marks them), ``seen`` images were
    seen before. Returns the slot list (new position or None) and the new ``seen``; advances ``rng``
    exactly as the detector's own sampling would.
    """
    slots: list[Optional[int]] = [None] * kept
    for position in range(n_new):
        seen += 1
        if len(slots) < capacity:
            slots.append(position)
        else:
            j = rng.randrange(seen)
            if j < capacity:
                slots[j] = position
    return slots, seen


def _normalised_inputs(detector: Any, items: Sequence[Any]) -> list[torch.Tensor]:
    """The normalised CPU input tensors of ``items``, as the detector's fit would store them."""
    out: list[torch.Tensor] = []
    for _, x in detector.iter_batches(list(items)):
        out.extend(img.detach().to("cpu", copy=True) for img in x)
    return out


def fit_detector_distributed(
    detector: Any,
    items: Any,
    *,
    update: bool = False,
    save_path: Optional[PathLike] = None,
    group: Optional[dist.ProcessGroup] = None,
    shard_mode: str = "strided",
    progress: bool = False,
) -> Any:
    """See ``fit_distributed``: the same contract for a CRDDetector whose items are images."""
    from ..detector.detector import SCORE_SAMPLE

    items = as_item_list(items)
    rank, _ = rank_and_world(group)
    params = (detector.scorer.lam_rel, detector.scorer.center, detector.scorer.rank)
    if not update:  # what CRDDetector.fit does before streaming
        detector.scorer = CRDScorer(*params)
        detector.threshold = None
        detector._reset_fit()
    old_stats = _scorer_statistics(detector.scorer)
    old_stats = _copy(old_stats) if old_stats is not None else None
    old_n_images = detector.n_images
    # The sample state before this fit: every rank replays the reservoir from here.
    rng = random.Random()
    rng.setstate(detector._sample_rng.getstate())
    old_sample, old_seen = list(detector._sample), detector._sample_seen

    def fit_shard(_: list[int], mine: list[Any]) -> Optional[PatchStatistics]:
        if not mine:
            return None
        detector.scorer = CRDScorer(*params)
        detector.partial_fit(mine, progress=progress and rank == 0)
        return _scorer_statistics(detector.scorer)

    indices, new = fit_shards(items, group, shard_mode, "fitting their shard of images", fit_shard)

    # The training-score sample: positions chosen by replaying the reservoir, inputs from their owners.
    slots, seen = replay_reservoir(rng, old_seen, len(old_sample), len(items), SCORE_SAMPLE)
    wanted = sorted({p for p in slots if p is not None}.intersection(indices))
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

    merged = _copy(old_stats).merge(new) if old_stats is not None else new
    detector.scorer = install_statistics(CRDScorer(*params), merged)
    detector.n_images = old_n_images + len(items)
    detector._sample = [old_sample[k] if p is None else inputs[p] for k, p in enumerate(slots)]
    detector._sample_seen = seen
    detector._sample_rng = rng
    detector._stats_stale = True
    if save_path is not None:
        save_on_rank0(lambda: detector.save(save_path), group, f"writing {save_path}")
    return detector
