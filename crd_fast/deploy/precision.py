"""Reduced head variants for deployment: the projection matrix stored in float16, and rank-r W.

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
``measure_error`` reports what each variant costs against the exact float64 score.

The position-aware (local) model has its own head file, kind ``"local_crd_head"``
(crd_fast/deploy/local_head_file.py); ``crd_fast.deploy.head_from`` / ``make_head_file`` (crd_fast/deploy/head_files.py)
pick the kind that fits a source, the functions of the same names here make global head files only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..core.projection import CRDProjection, eigen_form
from ..io.model_file import PathLike, read_model_file, require, write_model_file
from ..scorers.crd import CRDScorer

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


def rank_for_error_bound(scorer: CRDScorer, bound: float) -> Optional[int]:
    """The smallest rank r whose error bound (largest dropped shrink factor c_r) is <= ``bound``.

    Returns None when only the full rank meets it (then rank-r saves nothing). At rank r, for every y,
    0 <= score(y) - score_r(y) <= c_r ||y - mu||, so ``bound`` caps the relative error of the score
    against ||y - mu|| (the plain distance to the mean).
    """
    if not (isinstance(bound, (int, float)) and 0 < bound < 1):
        raise ValueError(f"bound must be in (0, 1), got {bound!r}")
    form = eigen_form(scorer.covariance, scorer.lam)
    dropped_ok = (form.shrink <= bound).nonzero()  # shrink descends: rows from the first index that qualifies may go
    if dropped_ok.numel() == 0:
        return None
    r = int(dropped_ok[0])
    return None if r >= scorer.dim else max(1, r)


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
            from ..scorers.local import LocalCRDScorer

            hint = (
                ": use LocalDeployHead (crd_fast.deploy.local_head_file)" if isinstance(scorer, LocalCRDScorer) else ""
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
        write_model_file(path, HEAD_KIND, tensors, fields)

    @classmethod
    def load(cls, path: PathLike, precision: Optional[str] = None, rank: Union[int, None, str] = "any") -> "DeployHead":
        """Read a head file, checking that its matrix agrees with its metadata and with what the caller expects.

        ``precision``: refuse a file of another precision (None: accept any). ``rank``: refuse a file of another
        rank ("any": accept any; None: require full rank).
        """
        tensors, meta = read_model_file(path, HEAD_KIND)
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


def relative_errors(approx: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """max and mean of |approx - exact| / |exact| (exact scores are positive CRD distances)."""
    rel = (approx.to(torch.float64) - exact.to(torch.float64)).abs() / exact.to(torch.float64).abs().clamp_min(1e-300)
    return {"max_rel": float(rel.max()), "mean_rel": float(rel.mean())}


def measure_error(
    scorer: CRDScorer,
    patches: torch.Tensor,
    patches_per_image: int,
    precision: str = "fp16",
    rank: Optional[int] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Score error of a head variant against the exact model (full-rank M_pre, float64, unfolded).

    ``patches`` is (n_images * patches_per_image, d), image by image; an image's score is its largest patch
    score. Returns max/mean relative errors of patch and image scores and the rank-r error bound.
    """
    if patches.ndim != 2 or patches.shape[0] % patches_per_image:
        raise ValueError(f"patches must be (n_images * {patches_per_image}, d), got shape {tuple(patches.shape)}")
    exact_proj = scorer.projection if scorer.rank is None else variant_projection(scorer, "fp64", None)
    y = patches.to(torch.float64)
    exact = torch.linalg.vector_norm((y - exact_proj.offset) @ exact_proj.matrix.T, dim=1)
    proj = variant_projection(scorer, precision, rank)
    approx = deployed_scores(patches, proj.matrix, proj.offset, compute_dtype)
    patch = relative_errors(approx, exact)
    image = relative_errors(approx.reshape(-1, patches_per_image).amax(1), exact.reshape(-1, patches_per_image).amax(1))
    return {
        "precision": precision,
        "rank": proj.rank,
        "compute": str(compute_dtype).replace("torch.", ""),
        "patch_max_rel": patch["max_rel"],
        "patch_mean_rel": patch["mean_rel"],
        "image_max_rel": image["max_rel"],
        "image_mean_rel": image["mean_rel"],
        "error_bound": proj.error_bound,
        "matrix_bytes": int(proj.matrix.shape[0] * proj.matrix.shape[1] * PRECISIONS[precision].itemsize),
    }


def make_head_file(
    source: Union[CRDScorer, Any, PathLike], path: PathLike, precision: str = "fp16", rank: Optional[int] = None
) -> DeployHead:
    """Write a head file from a fitted CRDScorer, a CRDDetector, or a detector/scorer model file; return the head."""
    head = head_from(source, precision, rank)
    head.save(path)
    return head


def head_from(
    source: Union[CRDScorer, Any, PathLike], precision: str = "fp64", rank: Optional[int] = None
) -> DeployHead:
    """A DeployHead from a fitted CRDScorer, a CRDDetector, or a detector or scorer model file."""
    if isinstance(source, CRDScorer):
        return DeployHead.from_scorer(source, precision, rank)
    if hasattr(source, "scorer") and hasattr(source, "config"):  # a CRDDetector (imported lazily: optional here)
        return DeployHead.from_scorer(_global(source).scorer, precision, rank, detector=detector_info(source))
    from ..io.model_file import ModelFileError

    try:
        return DeployHead.from_scorer(CRDScorer.load(source), precision, rank)
    except ModelFileError as exc:
        if "holds a 'crd_detector' model" not in str(exc):
            raise
    from ..detector.detector import CRDDetector

    detector = _global(CRDDetector.load(source))
    return DeployHead.from_scorer(detector.scorer, precision, rank, detector=detector_info(detector))


def _global(detector: Any) -> Any:
    """``detector``, if it scores with the global CRD (a head file holds the global projection)."""
    if getattr(detector, "spatial_choice", "global") == "local":
        raise ValueError(
            "this detector uses the local (position-aware) CRD model; these head files hold the global CRD projection "
            "only: crd_fast.deploy.make_head_file writes a local head file for it"
        )
    return detector


def detector_info(detector: Any) -> dict[str, Any]:
    """Everything about a fitted detector that a head file and the export metadata record (JSON-serialisable)."""
    shapes = [list(s) for s in detector.extractor.feature_shapes(detector.preprocess.crop)]
    return {
        "config": detector.config,
        "weights_identity": detector.weights_identity,
        "layers": list(detector.layers),
        "layer_channels": list(detector.layer_channels),
        "feature_shapes": shapes,
        "patch_grid": list(detector.patch_grid),
        "resize": detector.preprocess.resize,
        "crop": detector.preprocess.crop,
        "mean": list(detector.preprocess.mean),
        "std": list(detector.preprocess.std),
        "embedding": detector.embedding,
        "target_dim": detector.target_dim,
        "d": detector.dim,
        "lam_rel": getattr(detector, "lam_rel", None) or detector.scorer.lam_rel,
        "n_images": detector.n_images,
        "n_patches": detector.scorer.n_samples,
        "threshold": detector.threshold,
        "pixel_threshold": detector.pixel_threshold,
        "train_score_stats": detector.train_score_stats,
    }
