"""The global CRD as a scoring model: one mean and covariance for every patch position (the paper's CRD).

Wraps a :class:`~crd_fast.scorers.CRDScorer` (float64 running statistics; M_pre derived from them). Model files
hold it under the prefix ``crd.`` with its fields under ``crd`` (docs/DESIGN.md "Detector files"), as every
detector file has since the first format version, so files written before the scoring-model interface load
unchanged.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional

import torch
import torch.nn as nn

from ..core.stats import PatchStatistics
from ..io.model_file import PathLike, require
from ..models.head import CRDHead
from ..models.head_file import DeployHead, variant_projection
from ..scorers.crd import CRDScorer
from .base import FeatureLayout, ScorerBackedModel, UnsupportedOption
from .candidates import GlobalCandidate

#: The model file's tensor prefix and metadata field of this model.
PREFIX = "crd."
FIELD = "crd"


class GlobalCRD(ScorerBackedModel):
    """The global CRD: score ||M_pre (y - mu)|| with one M_pre for every position (docs/DESIGN.md "Method")."""

    name = "global"
    selectable = True

    @classmethod
    def create(cls, options: Mapping[str, Any]) -> "GlobalCRD":
        return cls(CRDScorer(options["lam_rel"], bool(options.get("center", True)), options.get("rank")))

    @classmethod
    def from_statistics(cls, stats: PatchStatistics, options: Mapping[str, Any]) -> "GlobalCRD":
        """The model of ``stats`` (taken over, not copied) with ``options`` (lam_rel, center, rank)."""
        model = cls.create(options)
        model.scorer.replace_statistics(stats)
        return model

    def fresh(self) -> "GlobalCRD":
        s = self.scorer
        return GlobalCRD(CRDScorer(s.lam_rel, s.center, s.rank))

    # ---- fitting ----------------------------------------------------------------------------------
    def partial_fit(self, grids: torch.Tensor) -> None:
        patches = grids.reshape(-1, grids.shape[-1])
        # Keep the float64 statistics on the features' device, so a GPU fit does not ship every batch of
        # patches to the CPU: seed them with two rows, move them, then add the rest.
        if not self.scorer.is_fitted:
            self.scorer.partial_fit(patches[:2])
            patches = patches[2:]
        stats = self.scorer.statistics
        if stats.device != patches.device:
            stats.to(patches.device)
        if patches.shape[0]:
            self.scorer.partial_fit(patches)

    @property
    def n_patches(self) -> int:
        return self.scorer.n_samples if self.scorer.is_fitted else 0

    @property
    def dim(self) -> Optional[int]:
        return self.scorer.dim if self.scorer.is_fitted else None

    def current_statistics(self) -> PatchStatistics:
        """The float64 sufficient statistics (distributed fits add them across processes exactly)."""
        return self.scorer.statistics

    def replace_statistics(self, stats: PatchStatistics) -> None:
        """Use ``stats`` (e.g. combined over processes) as this model's fit, keeping its options."""
        self.scorer.replace_statistics(stats)

    # ---- options ----------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        return {"lam_rel": self.scorer.lam_rel, "center": self.scorer.center, "rank": self.scorer.rank}

    # ---- scoring ----------------------------------------------------------------------------------
    def head(self, layout: FeatureLayout, use_fused: bool = True) -> nn.Module:
        return CRDHead.from_scorer(
            self.scorer, layout.embedding, layout.target_dim, list(layout.layer_channels), use_fused
        )

    def cache_key(self) -> Hashable:
        return self._version_of(self.scorer.projection)  # recomputed on any change of data, lam_rel, center, rank

    def export_head(self, layout: FeatureLayout, rank: Optional[int] = None) -> tuple[nn.Module, dict[str, Any]]:
        want_rank = rank if rank is not None else self.scorer.rank
        proj = variant_projection(self.scorer, "fp64", want_rank)
        head = CRDHead(
            proj.matrix, proj.offset, layout.embedding, layout.target_dim, list(layout.layer_channels), use_fused=False
        ).eval()
        return head, {"lam": proj.lam, "rank": want_rank, "error_bound": proj.error_bound}

    # ---- deployment ---------------------------------------------------------------------------------
    def deploy_head(
        self, precision: str, options: Mapping[str, Any], detector: Optional[dict[str, Any]] = None
    ) -> DeployHead:
        unknown = sorted(k for k, v in options.items() if v is not None and k != "rank")
        if "local_rank" in unknown:
            raise UnsupportedOption(
                f"local_rank={options['local_rank']} keeps per-position directions of the local model; this source "
                "scores with the global CRD: use rank= for its rank-r head"
            )
        if unknown:
            raise UnsupportedOption(f"the global CRD's head file takes precision and rank, not {unknown}")
        return DeployHead.from_scorer(self.scorer, precision, options.get("rank"), detector=detector)

    # ---- persistence --------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, fields = self.scorer.state(prefix=PREFIX)
        return tensors, {FIELD: fields}

    def summary(self) -> dict[str, Any]:
        return {"lam": self.scorer.lam, "lam_rel": self.scorer.lam_rel, "n_patches": self.scorer.n_samples}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], path: PathLike) -> "GlobalCRD":
        foreign = sorted(name for name in tensors if not name.startswith(PREFIX))
        require(not foreign, path, f"a global model file holds tensors of another model {foreign[:3]}")
        fields = meta.get(FIELD)
        require(isinstance(fields, dict), path, f"metadata field {FIELD!r} is not an object")
        return cls(CRDScorer.from_state(tensors, fields, path, prefix=PREFIX))

    # ---- the label-free choice ----------------------------------------------------------------------
    def candidate(self) -> GlobalCandidate:
        return GlobalCandidate(self.scorer.statistics, self.scorer.center)


__all__ = ["GlobalCRD"]
