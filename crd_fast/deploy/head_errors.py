"""What a reduced head variant costs: its score errors against the exact float64 model, and the rank a bound allows.

    from crd_fast.deploy import measure_error, rank_for_error_bound, measure_local_error

Global head files (crd_fast/models/head_file.py) store the projection in float16 or at rank r; local head files
(crd_fast/models/local_head_file.py) store M, S_p and K_p in float16 or keep the top-r per-position directions.
docs/DESIGN.md "Head files" and "Local head files" give the measured figures.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..core.local import LocalCRDModel
from ..core.projection import eigen_form
from ..models.head_file import PRECISIONS, deployed_scores, variant_projection
from ..models.local_head_file import LocalDeployHead
from ..scorers.crd import CRDScorer
from ..scorers.local import LocalCRDScorer


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


def measure_local_error(
    source: Union[LocalCRDScorer, LocalCRDModel],
    grids: torch.Tensor,
    precision: str = "fp16",
    rank: Optional[int] = None,
    compute_dtype: torch.dtype = torch.float32,
    lam_rel: Optional[float] = None,
) -> dict[str, Any]:
    """Score error of a local head variant (storage ``precision``, per-position ``rank``) against the exact
    float64 local model at full rank. ``grids`` (N, P, d): an image's score is its largest patch score.

    ``source``: a fitted LocalCRDScorer (its lam_rel unless ``lam_rel`` is given) or a LocalCRDModel (then
    ``lam_rel`` is required). Returns max/mean relative errors of patch and image scores and the stored bytes.
    """
    if isinstance(source, LocalCRDScorer):
        model, lam_rel = source.model(), source.lam_rel if lam_rel is None else lam_rel
    elif isinstance(source, LocalCRDModel):
        if lam_rel is None:
            raise ValueError("lam_rel is required with a LocalCRDModel")
        model = source
    else:
        raise TypeError(f"source must be a LocalCRDScorer or a LocalCRDModel, got {type(source).__name__}")
    exact = model.scores(grids, lam_rel)
    head = LocalDeployHead.from_model(model, lam_rel, precision, rank)
    approx = head.score(grids, compute_dtype)
    patch = relative_errors(approx, exact)
    image = relative_errors(approx.amax(dim=1), exact.amax(dim=1))
    return {
        "precision": precision,
        "rank": head.rank,
        "model_rank": model.rank,
        "compute": str(compute_dtype).replace("torch.", ""),
        "patch_max_rel": patch["max_rel"],
        "patch_mean_rel": patch["mean_rel"],
        "image_max_rel": image["max_rel"],
        "image_mean_rel": image["mean_rel"],
        "stored_bytes": head.stored_bytes(),
    }


__all__ = ["measure_error", "measure_local_error", "rank_for_error_bound", "relative_errors"]
