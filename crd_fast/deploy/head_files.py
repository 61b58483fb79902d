"""Head files: a fitted model's scoring-only form for small edge files, of whichever kind its scoring model makes.

    from crd_fast.deploy import make_head_file, load_head_file
    make_head_file("model.crd", "head16.crdh", precision="fp16")   # the kind the model's scoring model makes
    head = load_head_file("head16.crdh")                           # a DeployHead or a LocalDeployHead

Each scoring model makes its own head file (``ScoringModel.deploy_head``): the global CRD a ``DeployHead`` (kind
``"crd_head"``; ``rank=`` gives its rank-r W), the position-aware CRD a ``LocalDeployHead`` (kind
``"local_crd_head"``; ``local_rank=`` keeps the top-r per-position directions). An option the source's model has
no form for is refused by that model (docs/DESIGN.md "Local head files").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from safetensors import safe_open

from ..detector.detector import CRDDetector
from ..detector.persistence import MODEL_KIND as DETECTOR_KIND
from ..detector.persistence import detector_metadata
from ..io.model_file import METADATA_KEY, PathLike
from ..io.safety import check_outputs
from ..models.head_file import HEAD_KIND, DeployHead
from ..models.local_head_file import LOCAL_HEAD_KIND, LocalDeployHead
from ..scorers.crd import CRDScorer
from ..scorers.local import LocalCRDScorer
from ..scoring.base import ScoringModel
from ..scoring.global_crd import GlobalCRD
from ..scoring.local_crd import LocalCRD

AnyHead = Union[DeployHead, LocalDeployHead]
#: What a head file is made from: a fitted detector or scorer, or the path of a detector or scorer model file.
HeadSource = Union[CRDDetector, CRDScorer, LocalCRDScorer, PathLike]
#: What an export starts from: a fitted detector, a head file object, or the path of either kind of file.
ExportSource = Union[CRDDetector, DeployHead, LocalDeployHead, PathLike]
#: Head file kind -> its class (``load_head_file``).
HEAD_FILE_KINDS: dict[str, Any] = {HEAD_KIND: DeployHead, LOCAL_HEAD_KIND: LocalDeployHead}
#: Bare scorers accepted as a source, and the scoring model that wraps each.
_SCORER_MODELS: dict[type, Any] = {CRDScorer: GlobalCRD, LocalCRDScorer: LocalCRD}
_SCORER_FILES: dict[str, Any] = {"crd_scorer": CRDScorer, "local_crd_scorer": LocalCRDScorer}


def head_from(
    source: HeadSource, precision: str = "fp64", rank: Optional[int] = None, local_rank: Optional[int] = None
) -> AnyHead:
    """The head file form of ``source``: a fitted CRDDetector, a fitted CRDScorer or LocalCRDScorer, or a
    detector or scorer model file. ``rank`` / ``local_rank``: the global / local model's reduced form."""
    model, detector = _model_of(source)
    return model.deploy_head(precision, {"rank": rank, "local_rank": local_rank}, detector)


def make_head_file(
    source: HeadSource,
    path: PathLike,
    precision: str = "fp16",
    rank: Optional[int] = None,
    local_rank: Optional[int] = None,
) -> AnyHead:
    """Write the head file of ``source`` (see :func:`head_from`) to ``path``, atomically; return the head."""
    check_outputs(files=[path], inputs=[source] if isinstance(source, (str, os.PathLike)) else [])
    head = head_from(source, precision, rank, local_rank)
    head.save(path)
    return head


def load_head_file(path: PathLike) -> AnyHead:
    """Read a head file of any kind: a DeployHead (``"crd_head"``) or a LocalDeployHead (``"local_crd_head"``)."""
    cls = HEAD_FILE_KINDS.get(file_kind(path) or "", DeployHead)  # DeployHead: the clear error for anything else
    return cls.load(path)


def _model_of(source: HeadSource) -> tuple[ScoringModel, Optional[dict[str, Any]]]:
    """(scoring model, detector metadata or None) of a head file's source."""
    if isinstance(source, CRDDetector):
        if not source.is_fitted:
            raise RuntimeError("the detector is not fitted yet: it has no head")
        return source.model, detector_metadata(source)
    wrapper = _SCORER_MODELS.get(type(source))
    if wrapper is not None:
        return wrapper(source), None
    if not isinstance(source, (str, Path)) and not hasattr(source, "__fspath__"):
        raise TypeError(
            "source must be a CRDDetector, a CRDScorer, a LocalCRDScorer or a model file path, got "
            f"{type(source).__name__}"
        )
    kind = file_kind(source)
    if kind == DETECTOR_KIND:
        return _model_of(CRDDetector.load(source))
    scorer_cls = _SCORER_FILES.get(kind or "", CRDScorer)  # CRDScorer.load: the clear error for anything else
    return _model_of(scorer_cls.load(source))


def file_kind(path: Any) -> Optional[str]:
    """The ``kind`` a model file states (None if it cannot be read: the loader then says why)."""
    try:
        with safe_open(str(Path(path)), framework="pt") as fh:
            kind = json.loads((fh.metadata() or {})[METADATA_KEY]).get("kind")
    except Exception:  # any unreadable file: the kind's loader reports the problem
        return None
    return kind if isinstance(kind, str) else None


__all__ = [
    "ExportSource",
    "HeadSource",
    "HEAD_FILE_KINDS",
    "HEAD_KIND",
    "LOCAL_HEAD_KIND",
    "AnyHead",
    "file_kind",
    "head_from",
    "load_head_file",
    "make_head_file",
]
