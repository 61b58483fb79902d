"""Sharded prediction: every rank scores its shard, the small per-image results meet in input order.

    records = predict_sharded(detector, items, output="scores.csv")   # run on every rank (torchrun)

Only one small record per image travels (index, path, image score, normalised score, label), through
``all_gather_object``; anomaly maps stay on the rank that computed them and can be saved there by the
``on_result`` callback. Every rank returns the full list in input order; the union of the shards is
checked to be exactly the inputs, so nothing is lost or duplicated whatever the count.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..detector.detector import CRDDetector
from ..io.atomic import atomic_write
from ..io.model_file import PathLike
from ..io.safety import check_outputs, path_inputs
from ..scorers.crd import CRDScorer
from .items import as_item_list, check_items
from .reduce import DistributedError, all_gather_objects, raise_if_any_failed, rank_and_world
from .sharding import shard
from .steps import save_on_rank0

#: Record fields in CSV column order (fields a model does not produce are left out).
RECORD_FIELDS = ("index", "path", "image_score", "normalized_score", "label", "n_patches")

#: on_result(global_indices, result): called on each rank with what it computed for its shard.
ResultCallback = Callable[[list[int], Any], None]


def _path_of(item: Any) -> Optional[str]:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


def _float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _score_scorer(scorer: CRDScorer, items: Sequence[Any], indices: list[int]) -> tuple[list[dict], Any]:
    """Each item is an (N_i, d) patch array; its image score is the largest patch score."""
    records, per_item = [], []
    for index, item in zip(indices, items):
        scores = torch.as_tensor(scorer.score(item))
        if scores.numel() == 0:
            raise ValueError(f"items[{index}] has no patches to score")
        per_item.append(scores)
        records.append(
            {"index": index, "path": None, "image_score": _float(scores.max()), "n_patches": int(scores.numel())}
        )
    return records, per_item


def _score_detector(
    detector: CRDDetector, items: Sequence[Any], indices: list[int], progress: bool
) -> tuple[list[dict], Any]:
    if not items:
        return [], None
    result = detector.predict(list(items), progress=progress)
    n = len(result.image_scores)
    if n != len(items):
        raise DistributedError(f"the detector returned {n} results for {len(items)} images")
    paths = list(result.paths) if getattr(result, "paths", None) is not None else [None] * n
    records = []
    for k, index in enumerate(indices):
        rec: dict[str, Any] = {"index": index, "path": paths[k] if paths[k] is not None else _path_of(items[k])}
        rec["image_score"] = _float(result.image_scores[k])
        if getattr(result, "normalized_scores", None) is not None:
            rec["normalized_score"] = _float(result.normalized_scores[k])
        if getattr(result, "labels", None) is not None:
            rec["label"] = bool(result.labels[k])
        records.append(rec)
    return records, result


def _score_callable(
    fn: Callable[[list[Any]], Sequence[Any]], items: Sequence[Any], indices: list[int]
) -> tuple[list[dict], Any]:
    if not items:
        return [], []
    out = list(fn(list(items)))
    if len(out) != len(items):
        raise DistributedError(f"the scoring function returned {len(out)} results for {len(items)} items")
    records = []
    for index, item, value in zip(indices, items, out):
        rec = dict(value) if isinstance(value, dict) else {"image_score": _float(value)}
        rec["index"] = index
        rec.setdefault("path", _path_of(item))
        records.append(rec)
    return records, out


def merge_records(per_rank: Sequence[Sequence[dict]], n_items: int) -> list[dict]:
    """Concatenate every rank's records and put them in input order, checking each index appears once."""
    merged = sorted((r for recs in per_rank for r in recs), key=lambda r: r["index"])
    seen = [r["index"] for r in merged]
    if seen != list(range(n_items)):
        missing = sorted(set(range(n_items)) - set(seen))
        extra = len(seen) - len(set(seen))
        raise DistributedError(
            f"sharded results do not cover the {n_items} inputs exactly once: "
            f"{len(missing)} missing (first {missing[:5]}), {extra} duplicated"
        )
    return merged


def _check_output(output: Optional[PathLike], inputs: Any = ()) -> Optional[Path]:
    """The table's path, checked before any work: a .csv or .json name that replaces no input (crd_fast.io.safety)."""
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"output {path} must end in .csv or .json, got suffix {path.suffix!r}")
    check_outputs(files=[path], inputs=path_inputs(inputs))
    return path


def write_records(records: Sequence[dict], output: PathLike) -> Path:
    """Write records as CSV (one row each) or JSON (a list of objects), chosen by suffix, atomically."""
    path = _check_output(output)
    assert path is not None
    fields = [f for f in RECORD_FIELDS if any(f in r for r in records)]
    fields += sorted({k for r in records for k in r} - set(fields))
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            if path.suffix.lower() == ".json":
                clean = [
                    {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                    for r in records
                ]
                json.dump(clean, fh, indent=1)
                fh.write("\n")
            else:
                writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="raise")
                writer.writeheader()
                for r in records:
                    writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return path


def predict_sharded(
    model: Union[CRDDetector, CRDScorer, Callable[[list[Any]], Sequence[Any]]],
    items: Sequence[Any],
    *,
    output: Optional[PathLike] = None,
    on_result: Optional[ResultCallback] = None,
    group: Optional[dist.ProcessGroup] = None,
    shard_mode: str = "strided",
    progress: bool = False,
) -> list[dict]:
    """Score ``items`` split over the ranks; return every item's record, in input order, on every rank.

    ``model`` is a fitted CRDDetector (items are images; records hold index, path, image_score and,
    when the detector has a threshold, normalized_score and label), a fitted CRDScorer (items are
    (N_i, d) patch arrays; image_score is the largest patch score), or a function mapping a list of
    items to one score (or one dict) per item. ``on_result(indices, result)`` runs on each rank with its
    own shard's full result (e.g. to save anomaly maps). ``output`` (.csv or .json) is written by rank 0,
    atomically. A collective: every rank calls it with the same ``items``.
    """
    if isinstance(model, CRDDetector):
        items = as_item_list(items)
    items = check_items(items)
    out_path = _check_output(output, items)
    rank, world = rank_and_world(group)
    error: Optional[BaseException] = None
    records: list[dict] = []
    try:
        indices, mine = shard(items, rank, world, shard_mode)
        if isinstance(model, CRDScorer):
            records, result = _score_scorer(model, mine, indices)
        elif isinstance(model, CRDDetector):
            records, result = _score_detector(model, mine, indices, progress and rank == 0)
        elif callable(model):
            records, result = _score_callable(model, mine, indices)
        else:
            raise TypeError(f"model must be a CRDDetector, a CRDScorer or a function, got {type(model).__name__}")
        if on_result is not None and indices:
            on_result(indices, result)
    except Exception as exc:  # reported to every rank below, so none waits in a collective
        error = exc
    gathered = all_gather_objects((error is None, records if error is None else None), group)
    raise_if_any_failed(gathered, "scoring their shard", error)
    merged = merge_records([recs for _, recs in gathered], len(items))
    if out_path is not None:
        save_on_rank0(lambda: write_records(merged, out_path), group, f"writing {out_path}")
    return merged
