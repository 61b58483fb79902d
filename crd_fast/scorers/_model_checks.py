"""Checks on a stored scorer state (model-file metadata and tensors) before it is trusted.

Every field's type and range is checked (``check_state_fields``), and the stored projection is recomputed
from the stored statistics and compared (``projection_mismatch``): a file whose tensors were edited and its
checksum recomputed (say, a zeroed projection that scores everything 0) is refused, while a file written by
this code loads with its own projection untouched, so its scores stay identical.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from ..choices import MAX_DIM as CHOICES_MAX_DIM
from ..core.projection import CRDProjection
from ..io.model_file import PathLike, require

#: Largest feature dimension and training-patch count a model file may declare (2**53: exact in float64).
MAX_DIM = CHOICES_MAX_DIM
MAX_COUNT = 1 << 53
_EPS64 = float(torch.finfo(torch.float64).eps)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_state_fields(fields: Mapping[str, Any], path: PathLike) -> tuple:
    """(d, n, lam, lam_rel, center, rank, error_bound) from scorer metadata, each of the right type and range."""
    require(isinstance(fields, Mapping), path, "scorer metadata is not a JSON object")
    for key in ("d", "n", "lam", "lam_rel", "center", "rank"):
        require(key in fields, path, f"metadata field {key!r} is missing")
    d, n, lam, lam_rel = fields["d"], fields["n"], fields["lam"], fields["lam_rel"]
    center, rank, error_bound = fields["center"], fields["rank"], fields.get("error_bound", 0.0)
    require(_is_int(d) and 1 <= d <= MAX_DIM, path, f"d={d!r} is not an integer in [1, {MAX_DIM}]")
    require(
        _is_int(n) and 2 <= n <= MAX_COUNT,
        path,
        f"n={n!r} is not an integer in [2, 2**53] (at least 2 training patches are needed)",
    )
    require(_is_real(lam) and lam > 0, path, f"lam={lam!r} is not a positive finite number")
    require(_is_real(lam_rel) and lam_rel > 0, path, f"lam_rel={lam_rel!r} is not a positive finite number")
    require(isinstance(center, bool), path, f"center={center!r} is not true or false")
    require(
        rank is None or (_is_int(rank) and rank >= 1), path, f"rank={rank!r} is neither null nor a positive integer"
    )
    require(
        _is_real(error_bound) and 0 <= error_bound <= 1, path, f"error_bound={error_bound!r} is not a number in [0, 1]"
    )
    return d, n, float(lam), float(lam_rel), center, rank, float(error_bound)


def projection_mismatch(stored: CRDProjection, cov: torch.Tensor) -> Optional[str]:
    """None if ``stored`` is the projection ``cov`` gives (to rounding), else what differs.

    Compared through G = P^T P (d x d), which does not depend on the eigenvectors' signs, so a rank-r file
    written on another machine (another LAPACK) still matches. The tolerance follows the conditioning of
    C + lam I: eigenvectors move by about eps64 * (s_max + lam) / lam between implementations.
    """
    rank = stored.rank if stored.matrix.shape[0] < stored.matrix.shape[1] else None
    fresh = CRDProjection.from_covariance(cov, stored.offset, stored.lam, rank)
    if abs(fresh.error_bound - stored.error_bound) > 1e-6 * max(1.0, fresh.error_bound):
        return f"error_bound {stored.error_bound!r}, the statistics give {fresh.error_bound!r}"
    g_stored = stored.matrix.T @ stored.matrix
    g_fresh = fresh.matrix.T @ fresh.matrix
    s_max = float(torch.trace(cov))  # >= the largest eigenvalue of the PSD C, and cheap
    cond = (s_max + stored.lam) / stored.lam
    scale = float(torch.linalg.matrix_norm(g_fresh))
    diff = float(torch.linalg.matrix_norm(g_stored - g_fresh))
    if not diff <= 1e-6 * scale + 100 * _EPS64 * cond * math.sqrt(cov.shape[0]) * max(scale, 1.0):
        return f"|P^T P - recomputed| = {diff:.3g} (scale {scale:.3g})"
    return None
