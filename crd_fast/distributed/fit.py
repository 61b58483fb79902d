"""Distributed fitting: every rank streams its shard, the ranks add their statistics, rank 0 writes.

    fit_distributed(model, items, save_path="model.crd")   # run on every rank (torchrun)

``items`` is the full, ordered list of inputs, the same on every rank; rank r takes its shard (see
``sharding``). For a CRDScorer an item is one (N_i, d) array of patch features; for a CRDDetector an
item is one image (path, array or tensor). Each rank adds its shard's patches to float64 statistics
(only d x d sums, whatever the shard size), ``all_reduce_statistics`` combines them exactly, and every
rank ends with the same fitted model. Rank 0 alone writes ``save_path``, atomically and only after
every rank has finished: an exception or a killed process on any rank leaves no file, or the old one
untouched. ``update=True`` adds the new items to an already fitted (e.g. loaded) model instead of
replacing it: the result equals a fit on the old and new inputs together.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch.distributed as dist
from tqdm.auto import tqdm

from ..core.stats import PatchStatistics
from ..detector.detector import CRDDetector
from ..io.model_file import PathLike
from ..io.safety import check_outputs, path_inputs
from ..scorers._validation import as_patch_matrix
from ..scorers.crd import CRDScorer
from .detector import fit_detector_distributed
from .items import as_item_list, check_items
from .reduce import rank_and_world
from .steps import copy_statistics, fit_shards, save_on_rank0

__all__ = ["fit_distributed", "install_statistics"]


def install_statistics(scorer: CRDScorer, stats: PatchStatistics) -> CRDScorer:
    """Replace ``scorer``'s statistics with ``stats`` (its lam_rel, center and rank are kept).

    The same as ``scorer.replace_statistics(stats)``, kept here for existing callers.
    """
    return scorer.replace_statistics(stats)


def _patch_shard_statistics(
    items: Sequence[Any], dim: Optional[int], indices: Sequence[int], progress: bool = False
) -> Optional[PatchStatistics]:
    """Float64 statistics of a shard of (N_i, d) patch arrays; None for an empty shard."""
    stats: Optional[PatchStatistics] = None
    for index, item in tqdm(
        zip(indices, items), total=len(items), desc="fit (this rank's shard)", disable=not progress
    ):
        x, _ = as_patch_matrix(item, f"items[{index}]", dim=dim, min_rows=1)
        if stats is None:
            stats = PatchStatistics(x.shape[1])
            dim = x.shape[1]
        stats.update(x)
    return stats


def fit_distributed(
    model: Union[CRDScorer, CRDDetector],
    items: Sequence[Any],
    *,
    update: bool = False,
    save_path: Optional[PathLike] = None,
    group: Optional[dist.ProcessGroup] = None,
    shard_mode: str = "strided",
    progress: bool = False,
) -> Union[CRDScorer, CRDDetector]:
    """Fit ``model`` (a CRDScorer or CRDDetector) on ``items`` split over the ranks of ``group``.

    A collective: every rank calls it with the same ``items`` and an identically configured model.
    Returns ``model``, fitted identically on every rank. Without a process group it is a plain
    single-process fit. If any rank fails, every rank raises (the failing one its own error, the others
    DistributedError) and nothing is written.
    """
    if save_path is not None:  # before any work, on every rank: the model may overwrite none of its inputs
        check_outputs(files=[save_path], inputs=path_inputs(items))
    if isinstance(model, CRDDetector):
        items = check_items(as_item_list(items))
        return fit_detector_distributed(
            model, items, update=update, save_path=save_path, group=group, shard_mode=shard_mode, progress=progress
        )
    items = check_items(items)
    if not isinstance(model, CRDScorer):
        raise TypeError(f"model must be a CRDScorer or CRDDetector, got {type(model).__name__}")

    rank, _ = rank_and_world(group)
    old = model.statistics if update and model.is_fitted else None
    dim = old.dim if old is not None else None
    _, new = fit_shards(
        items,
        group,
        shard_mode,
        "fitting their shard",
        lambda indices, mine: _patch_shard_statistics(mine, dim, indices, progress and rank == 0),
    )
    if old is not None:
        if old.dim != new.dim:
            raise ValueError(f"the model was fitted on d={old.dim} features but the new items have d={new.dim}")
        merged = copy_statistics(old).merge(new)
    else:
        merged = new
    if merged.count < 2:
        raise ValueError(f"CRD needs at least 2 training patches, got {merged.count} over all ranks")
    model.replace_statistics(merged)
    if save_path is not None:
        save_on_rank0(lambda: model.save(save_path), group, f"writing {save_path}")
    return model
