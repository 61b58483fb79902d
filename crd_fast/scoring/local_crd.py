"""The position-aware ("local") CRD as a scoring model: a mean and a low-rank covariance part per patch position.

Wraps a :class:`~crd_fast.scorers.LocalCRDScorer` (per-position means, pooled statistics and Frequent Directions
sketches, one pass; docs/DESIGN.md "Position-aware CRD"). Model files hold it under the prefix ``local.`` with its
fields under ``local``, beside the global CRD of the same (pooled) patches under ``crd.`` at the same lam_rel,
which ``derive("global")`` gives without refitting: the layout of every local model file so far, so files written
before the scoring-model interface load unchanged.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional

import torch
import torch.nn as nn

from ..core.local import LocalCRDModel
from ..io.model_file import ModelFileError, PathLike, require
from ..models.local_head import LocalCRDHead
from ..models.local_head_file import LocalDeployHead
from ..scorers.crd import CRDScorer
from ..scorers.local import LocalCRDScorer
from .base import FeatureLayout, ScorerBackedModel, ScoringModel, UnsupportedOption
from .candidates import LocalCandidate
from .global_crd import FIELD as GLOBAL_FIELD
from .global_crd import PREFIX as GLOBAL_PREFIX
from .global_crd import GlobalCRD

PREFIX = "local."
FIELD = "local"
#: Positions the candidate's eigenpairs are found and rotated for at a time (``LocalCRDModel.from_statistics``).
CANDIDATE_GROUP = 8


class LocalCRD(ScorerBackedModel):
    """The local CRD (docs/DESIGN.md "Local model"). ``center`` and ``rank`` are the options of the pooled global
    CRD stored beside it (and given by ``derive("global")``)."""

    name = "local"
    selectable = True
    derives = ("global",)

    def __init__(self, scorer: LocalCRDScorer, center: bool = True, rank: Optional[int] = None) -> None:
        super().__init__(scorer)
        self.center = bool(center)
        self.rank = rank

    @classmethod
    def create(cls, options: Mapping[str, Any]) -> "LocalCRD":
        scorer = LocalCRDScorer(options["lam_rel"], shrinkage=options["local_shrinkage"], rank=options["local_rank"])
        return cls(scorer, bool(options.get("center", True)), options.get("rank"))

    def fresh(self) -> "LocalCRD":
        s = self.scorer
        return LocalCRD(LocalCRDScorer(s.lam_rel, s.shrinkage, s.rank, s.sketch), self.center, self.rank)

    # ---- fitting ----------------------------------------------------------------------------------
    def partial_fit(self, grids: torch.Tensor) -> None:
        self.scorer.partial_fit(grids)

    @property
    def n_patches(self) -> int:
        return self.scorer.pooled_statistics.count if self.scorer.is_fitted else 0

    @property
    def dim(self) -> Optional[int]:
        return self.scorer.dim

    @property
    def positions(self) -> Optional[int]:
        return self.scorer.positions

    def derive(self, name: str) -> ScoringModel:
        if name != GlobalCRD.name:
            return super().derive(name)
        return GlobalCRD(CRDScorer.from_statistics(self.scorer.pooled_statistics, self.lam_rel, self.center, self.rank))

    # ---- options ----------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        s = self.scorer
        return {"lam_rel": s.lam_rel, "local_rank": s.rank, "local_shrinkage": s.shrinkage}

    # ---- scoring ----------------------------------------------------------------------------------
    def head(self, layout: FeatureLayout, use_fused: bool = True) -> nn.Module:
        return LocalCRDHead.from_model(
            self.scorer.model(),
            self.scorer.lam_rel,
            layout.embedding,
            layout.target_dim,
            list(layout.layer_channels),
            use_fused,
            grid=layout.patch_grid,
        )

    def cache_key(self) -> Hashable:
        # the model is rebuilt by the scorer whenever its data, shrinkage or rank change; lam_rel only rescales it
        return (self._version_of(self.scorer.model()), self.scorer.lam_rel)

    def export_head(self, layout: FeatureLayout, rank: Optional[int] = None) -> tuple[nn.Module, dict[str, Any]]:
        if rank is not None:
            raise UnsupportedOption(
                f"rank={rank} makes a rank-r head of the global CRD; this detector scores with the position-aware "
                "(local) head, which has no rank-r form: export it without rank="
            )
        head = self.head(layout, use_fused=False).cpu().eval()
        return head, {"lam": head.lam, "rank": None, "error_bound": None, "local_rank": head.rank}

    # ---- deployment ---------------------------------------------------------------------------------
    def deploy_head(
        self, precision: str, options: Mapping[str, Any], detector: Optional[dict[str, Any]] = None
    ) -> LocalDeployHead:
        if options.get("rank") is not None:
            raise UnsupportedOption(
                f"rank={options['rank']} makes the global head's rank-r W (a truncated shared matrix); this source "
                "scores with the local (position-aware) model, which has no such form: pass local_rank= to keep the "
                "top-r per-position directions instead"
            )
        unknown = sorted(k for k, v in options.items() if v is not None and k not in ("rank", "local_rank"))
        if unknown:
            raise UnsupportedOption(f"the local CRD's head file takes precision and local_rank, not {unknown}")
        info = None if detector is None else {**detector, "lam_rel": self.scorer.lam_rel, "spatial": self.name}
        grid = tuple(detector["patch_grid"]) if detector and detector.get("patch_grid") else None
        return LocalDeployHead.from_scorer(self.scorer, precision, options.get("local_rank"), detector=info, grid=grid)

    # ---- persistence --------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        pooled = self.derive(GlobalCRD.name)
        tensors, fields = pooled.state()
        local_tensors, local_fields = self.scorer.state(prefix=PREFIX)
        return {**tensors, **local_tensors}, {**fields, FIELD: local_fields}

    def summary(self) -> dict[str, Any]:
        return {"lam": self.scorer.lam(), "lam_rel": self.scorer.lam_rel, "n_patches": self.n_patches}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], path: PathLike) -> "LocalCRD":
        foreign = sorted(n for n in tensors if not (n.startswith(PREFIX) or n.startswith(GLOBAL_PREFIX)))
        require(not foreign, path, f"a local model file holds tensors of another model {foreign[:3]}")
        local_names = [n for n in tensors if n.startswith(PREFIX)]
        require(
            bool(local_names) and isinstance(meta.get(FIELD), dict),
            path,
            "the file says spatial 'local' but holds no local model (tensors 'local.*' and field 'local')",
        )
        fields = meta.get(GLOBAL_FIELD)
        require(isinstance(fields, dict), path, f"metadata field {GLOBAL_FIELD!r} is not an object")
        pooled = CRDScorer.from_state(tensors, fields, path, prefix=GLOBAL_PREFIX)  # checked, as every crd block
        try:
            local = LocalCRDScorer.from_state(tensors, meta[FIELD], path, prefix=PREFIX)
        except ModelFileError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise ModelFileError(f"{path}: the local model is unusable: {exc}") from exc
        return cls(local, pooled.center, pooled.rank)

    # ---- the label-free choice ----------------------------------------------------------------------
    def candidate(self) -> LocalCandidate:
        # float32 S~: the choice's largest product, and the candidate only compares and ranks (candidates.py); a
        # few positions at a time, so the build's temporaries stay small beside the fit's sketches (its peak)
        s = self.scorer
        model = LocalCRDModel.from_statistics(
            s.statistics, s.rank, s.shrinkage, dtype=torch.float32, group=CANDIDATE_GROUP
        )
        return LocalCandidate(model)


__all__ = ["LocalCRD"]
