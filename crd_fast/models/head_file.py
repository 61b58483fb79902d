"""The global CRD's head file: the projection matrix in a storage precision (float16 for small files) or rank-r W.

The exact model keeps float64 statistics and scores with the full-rank M_pre; that stays the default.
For small edge files a *head file* (model-file kind ``"crd_head"``) holds only what scoring needs:

    matrix  (r x d) in the stored precision: M_pre (r = d) or the top-r rows of W = diag(c) U^T
    offset  (d,)    float64: the patch mean mu (zeros for the uncentred form)

plus the metadata (precision, rank, lam, the rank-r error bound and, when made from a detector, the
detector's own metadata: config, layers, threshold, training score statistics). Its metadata says
``precision`` and ``rank`` and loading checks that the stored matrix agrees with both, and with any
value the caller expects. A head file cannot be refitted or re-regularised (the statistics are not in
it): keep the full model file for that.

Scoring always computes in float32 (or float64); float16 is a storage format here, so its error is
the rounding of the matrix entries (|entries| <= 1: eigenvalues of M_pre lie in (0, 1]).
``crd_fast.deploy.measure_error`` (crd_fast/deploy/head_errors.py) reports what each variant costs against the
exact float64 score.

The position-aware (local) model has its own head file, kind ``"local_crd_head"``
(crd_fast/models/local_head_file.py). Each scoring model makes its own head file (``ScoringModel.deploy_head``);
``crd_fast.deploy.head_from`` / ``make_head_file`` / ``load_head_file`` (crd_fast/deploy/head_files.py) are the
public entry points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..choices import WEIGHT_SOURCES
from ..core.projection import CRDProjection
from ..io.model_file import PathLike, read_model_file, require, write_model_file
from ..scorers.crd import CRDScorer
from ..scorers.local import LocalCRDScorer
from .head import CRDHead

#: Storage precisions of the head matrix, by name.
PRECISIONS: dict[str, torch.dtype] = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16}
HEAD_KIND = "crd_head"


def check_precision(precision: str) -> torch.dtype:
    """The torch dtype of a precision name; a clear error for anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def round_matrix(matrix: torch.Tensor, precision: str) -> torch.Tensor:
    """``matrix`` rounded to ``precision`` (round to nearest) and returned as float64 holding those exact values."""
    dtype = check_precision(precision)
    stored = matrix.to(dtype)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"the head matrix does not fit in {precision} (entries up to {float(matrix.abs().max()):.3g})")
    return stored.to(torch.float64)


def variant_projection(scorer: CRDScorer, precision: str = "fp64", rank: Optional[int] = None) -> CRDProjection:
    """The projection of ``scorer`` at ``rank`` (None: full-rank M_pre) with its matrix rounded to ``precision``.

    The scorer itself is not changed (its own rank setting is ignored here).
    """
    check_precision(precision)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    copy = CRDScorer.from_state(*scorer.state())  # a private copy: setting its rank recomputes only its projection
    copy.rank = None if rank is None or rank >= scorer.dim else rank
    proj = copy.projection
    return CRDProjection(
        round_matrix(proj.matrix, precision), proj.offset.clone(), proj.lam, proj.rank, proj.error_bound
    )


def weights_file_of(detector: Optional[Mapping[str, Any]]) -> list[str]:
    """The backbone weights file a head file's detector metadata names (an input its ``save`` must not replace)."""
    weights = ((detector or {}).get("config") or {}).get("weights")
    return [weights] if isinstance(weights, str) and weights not in WEIGHT_SOURCES else []


@dataclass
class DeployHead:
    """A scoring-only CRD head (matrix in a stored precision, offset, metadata): what a head file holds.

    ``matrix`` is float64 holding exactly the stored values, so the reference math applies unchanged.
    """

    matrix: torch.Tensor
    offset: torch.Tensor
    lam: float
    precision: str = "fp64"
    rank: Optional[int] = None
    error_bound: float = 0.0
    lam_rel: Optional[float] = None
    center: bool = True
    n: int = 0
    detector: Optional[dict[str, Any]] = field(default=None)  # the source detector's metadata, when known

    @classmethod
    def from_scorer(
        cls,
        scorer: CRDScorer,
        precision: str = "fp64",
        rank: Optional[int] = None,
        detector: Optional[dict[str, Any]] = None,
    ) -> "DeployHead":
        """The head of a fitted scorer at ``rank`` with its matrix stored in ``precision``."""
        if not isinstance(scorer, CRDScorer):
            hint = (
                ": use LocalDeployHead (crd_fast.models.local_head_file)" if isinstance(scorer, LocalCRDScorer) else ""
            )
            raise TypeError(
                f"DeployHead holds the global CRD projection of a CRDScorer, got a {type(scorer).__name__}{hint}"
            )
        proj = variant_projection(scorer, precision, rank)
        return cls(
            matrix=proj.matrix,
            offset=proj.offset,
            lam=proj.lam,
            precision=precision,
            rank=proj.rank,
            error_bound=proj.error_bound,
            lam_rel=scorer.lam_rel,
            center=scorer.center,
            n=scorer.n_samples,
            detector=detector,
        )

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def projection(self) -> CRDProjection:
        """As a CRDProjection (matrix float64 with the stored values, offset, lam, rank, error bound)."""
        return CRDProjection(self.matrix, self.offset, self.lam, self.rank, self.error_bound)

    def score(self, Y: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Scores of (N, d) patches as deployed: ||matrix y - q||, q = matrix mu, computed in ``dtype``."""
        return deployed_scores(Y, self.matrix, self.offset, dtype)

    def export_head(
        self, embedding: str, target_dim: int, layer_channels: Sequence[int], rank: Optional[int] = None
    ) -> tuple[CRDHead, dict[str, Any]]:
        """The CRDHead an ONNX export traces (pure-torch path) with exactly the stored values, and what the export
        metadata records about it. ``rank``: must be this file's own (a head file has one rank)."""
        if rank is not None and rank != (self.rank or self.dim):
            raise ValueError(f"the head file has rank={self.rank}; make a head file of rank {rank} instead")
        head = CRDHead(self.matrix, self.offset, embedding, target_dim, list(layer_channels), use_fused=False).eval()
        facts = {"lam": self.lam, "rank": self.rank, "error_bound": self.error_bound, "spatial": "global"}
        return head, {**facts, "head_matrix_precision": self.precision}

    # ---- files ------------------------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write a head file (safetensors + JSON, atomic) with the matrix in its stored precision."""
        tensors = {"matrix": self.matrix.to(PRECISIONS[self.precision]), "offset": self.offset.to(torch.float64)}
        fields = {
            "precision": self.precision,
            "rank": self.rank,
            "d": self.dim,
            "r": int(self.matrix.shape[0]),
            "lam": self.lam,
            "lam_rel": self.lam_rel,
            "center": self.center,
            "n": self.n,
            "error_bound": self.error_bound,
            "detector": self.detector,
        }
        write_model_file(
            path, HEAD_KIND, tensors, fields, check=type(self).from_file_state, inputs=weights_file_of(self.detector)
        )

    @classmethod
    def load(cls, path: PathLike, precision: Optional[str] = None, rank: Union[int, None, str] = "any") -> "DeployHead":
        """Read a head file, checking that its matrix agrees with its metadata and with what the caller expects.

        ``precision``: refuse a file of another precision (None: accept any). ``rank``: refuse a file of another
        rank ("any": accept any; None: require full rank).
        """
        tensors, meta = read_model_file(path, HEAD_KIND)
        return cls.from_file_state(tensors, meta, path, precision, rank)

    @classmethod
    def from_file_state(
        cls,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        path: PathLike = "<memory>",
        precision: Optional[str] = None,
        rank: Union[int, None, str] = "any",
    ) -> "DeployHead":
        """``load``'s checks and rebuild on a file's tensors and metadata (``save`` runs them before writing)."""
        require("matrix" in tensors and "offset" in tensors, path, "tensors 'matrix' and 'offset' are required")
        matrix, offset = tensors["matrix"], tensors["offset"]
        stored = meta.get("precision")
        require(stored in PRECISIONS, path, f"precision {stored!r} is not one of {tuple(PRECISIONS)}")
        require(
            matrix.dtype == PRECISIONS[stored],
            path,
            f"matrix is {matrix.dtype} but the metadata says precision={stored}",
        )
        if precision is not None and stored != precision:
            raise ValueError(f"{path}: head file holds precision={stored}, expected {precision}")
        file_rank = meta.get("rank")
        d = int(meta.get("d", -1))
        r = d if file_rank is None else int(file_rank)
        require(
            matrix.ndim == 2 and tuple(matrix.shape) == (r, d),
            path,
            f"matrix shape {tuple(matrix.shape)}, expected {(r, d)} (rank={file_rank})",
        )
        require(
            offset.dtype == torch.float64 and tuple(offset.shape) == (d,),
            path,
            f"offset must be float64 of shape ({d},)",
        )
        require(
            bool(torch.isfinite(matrix).all()) and bool(torch.isfinite(offset).all()),
            path,
            "matrix or offset holds NaN or Inf",
        )
        if rank != "any" and file_rank != rank:
            raise ValueError(f"{path}: head file has rank={file_rank}, expected {rank}")
        lam = float(meta["lam"])
        require(math.isfinite(lam) and lam > 0, path, f"lam={lam} must be positive")
        return cls(
            matrix=matrix.to(torch.float64),
            offset=offset,
            lam=lam,
            precision=stored,
            rank=file_rank,
            error_bound=float(meta.get("error_bound", 0.0)),
            lam_rel=meta.get("lam_rel"),
            center=bool(meta.get("center", True)),
            n=int(meta.get("n", 0)),
            detector=meta.get("detector"),
        )


def deployed_scores(
    Y: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """||matrix y - matrix mu|| per row, the way the exported head computes it (offset folded into q, in ``dtype``)."""
    q = (matrix.to(torch.float64) @ offset.to(torch.float64)).to(dtype)  # folded in float64, then cast
    z = Y.to(dtype) @ matrix.to(dtype).T - q
    return torch.linalg.vector_norm(z, dim=1)
