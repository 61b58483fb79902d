"""Head files of either kind: the global CRD's (``"crd_head"``) or the position-aware model's (``"local_crd_head"``).

    from crd_fast.deploy import make_head_file, load_head_file
    make_head_file("model.crd", "head16.crdh", precision="fp16")   # the kind that fits the model
    head = load_head_file("head16.crdh")                           # a DeployHead or a LocalDeployHead

A source that scores with the local model (a LocalCRDScorer, its model file, or a detector whose
``spatial_choice`` is "local") gives a local head file; any other a global one. ``rank`` is the global head's
rank-r W (a truncated shared matrix) and has no local form; ``local_rank`` keeps the top-r per-position
directions of a local model (docs/DESIGN.md "Local head files"). Each is refused for the other kind of source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from ..io.model_file import METADATA_KEY, PathLike
from ..scorers.crd import CRDScorer
from ..scorers.local import LocalCRDScorer
from . import precision as global_heads
from .local_head_file import LOCAL_HEAD_KIND, LocalDeployHead
from .precision import HEAD_KIND, DeployHead

AnyHead = Union[DeployHead, LocalDeployHead]


def head_from(
    source: Any, precision: str = "fp64", rank: Optional[int] = None, local_rank: Optional[int] = None
) -> AnyHead:
    """A DeployHead or LocalDeployHead from a fitted scorer (CRDScorer, LocalCRDScorer), a CRDDetector, or a
    scorer or detector model file, whichever kind fits the source (see the module docstring)."""
    if isinstance(source, LocalCRDScorer) or _is_local_detector(source):
        return _local(source, precision, rank, local_rank)
    if isinstance(source, CRDScorer) or hasattr(source, "config"):
        return _global(source, precision, rank, local_rank)
    kind = _file_kind(source)
    if kind == "local_crd_scorer":
        return _local(LocalCRDScorer.load(source), precision, rank, local_rank)
    if kind == "crd_detector":
        from ..detector.detector import CRDDetector

        detector = CRDDetector.load(source)
        if _is_local_detector(detector):
            return _local(detector, precision, rank, local_rank)
        return _global(detector, precision, rank, local_rank)
    return _global(source, precision, rank, local_rank)  # a scorer file, or the global loader's clear error


def make_head_file(
    source: Any,
    path: PathLike,
    precision: str = "fp16",
    rank: Optional[int] = None,
    local_rank: Optional[int] = None,
) -> AnyHead:
    """Write the head file of ``source`` (see :func:`head_from`) to ``path``, atomically; return the head."""
    head = head_from(source, precision, rank, local_rank)
    head.save(path)
    return head


def load_head_file(path: PathLike) -> AnyHead:
    """Read a head file of either kind: a DeployHead (``"crd_head"``) or a LocalDeployHead (``"local_crd_head"``)."""
    if _file_kind(path) == LOCAL_HEAD_KIND:
        return LocalDeployHead.load(path)
    return DeployHead.load(path)  # also the clear error for anything that is not a head file


def _is_local_detector(source: Any) -> bool:
    return hasattr(source, "config") and getattr(source, "spatial_choice", None) == "local"


def _file_kind(path: Any) -> Optional[str]:
    """The ``kind`` a model file states (None if it cannot be read: the loader then says why)."""
    try:
        from safetensors import safe_open

        with safe_open(str(Path(path)), framework="pt") as fh:
            kind = json.loads((fh.metadata() or {})[METADATA_KEY]).get("kind")
    except Exception:  # any unreadable file: the kind's loader reports the problem
        return None
    return kind if isinstance(kind, str) else None


def _global(source: Any, precision: str, rank: Optional[int], local_rank: Optional[int]) -> DeployHead:
    if local_rank is not None:
        raise ValueError(
            f"local_rank={local_rank} keeps per-position directions of the local model; this source scores with "
            "the global CRD: use rank= for its rank-r head"
        )
    return global_heads.head_from(source, precision, rank)


def _local(source: Any, precision: str, rank: Optional[int], local_rank: Optional[int]) -> LocalDeployHead:
    if rank is not None:
        raise ValueError(
            f"rank={rank} makes the global head's rank-r W (a truncated shared matrix); this source scores with "
            "the local (position-aware) model, which has no such form: pass local_rank= to keep the top-r "
            "per-position directions instead"
        )
    if isinstance(source, LocalCRDScorer):
        return LocalDeployHead.from_scorer(source, precision, local_rank)
    return LocalDeployHead.from_detector(source, precision, local_rank)


__all__ = ["HEAD_KIND", "LOCAL_HEAD_KIND", "AnyHead", "head_from", "load_head_file", "make_head_file"]
