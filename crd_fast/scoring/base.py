"""The scoring-model interface: what the detector, the label-free choice, deploy and distributed fitting speak to.

A scoring model turns the patch embeddings of normal images into a model (``partial_fit`` on (B, P, d) patch grids,
``merge`` for fits made elsewhere) and gives the torch module that scores feature maps (``head``). It saves and
loads itself (``state`` / ``from_state``), makes its deploy-time head file (``deploy_head``) and, when it takes
part in the label-free choice, its candidate (``candidate``). Each model is one class registered under its name
(crd_fast/scoring/registry.py); the built-in ones are the global CRD (global_crd.py) and the position-aware CRD
(local_crd.py). How to add one: docs/DESIGN.md "A new scoring model".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Hashable, Mapping, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from ..io.model_file import PathLike

if TYPE_CHECKING:
    from .candidates import Candidate


@dataclass(frozen=True)
class FeatureLayout:
    """How a detector's feature maps become patches: what a head needs to score the maps directly.

    ``embedding`` and ``target_dim`` name the patch embedding (crd_fast/core/embedding.py), ``layer_channels``
    the channels of each backbone layer, ``patch_grid`` the (h, w) grid of the first layer (P = h w positions).
    """

    embedding: str
    target_dim: int
    layer_channels: tuple[int, ...]
    patch_grid: tuple[int, int]

    @property
    def positions(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]


class ScoreHead(Protocol):
    """What ``ScoringModel.head`` returns: an ``nn.Module`` from feature maps (one per layer) to (B, h, w) patch scores.

    ``torch_forward`` is the pure-torch path that tracing and ONNX export take (default-domain operators only);
    ``use_fused`` says whether eager calls may take a fused kernel instead; ``half_weights`` lists the tensors an
    fp16 ONNX export stores in float16 (empty: nothing to halve).
    """

    use_fused: bool

    def __call__(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def torch_forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def half_weights(self) -> list[torch.Tensor]: ...


class DeployableHead(Protocol):
    """A head file's in-memory form (``ScoringModel.deploy_head``): saved to one file, exported to ONNX."""

    lam: Optional[float]
    detector: Optional[dict[str, Any]]

    def save(self, path: PathLike) -> None: ...


class UnsupportedOption(ValueError):
    """A deploy or export option the scoring model has no form for (e.g. a rank-r head of the local model)."""


class ScoringModel(ABC):
    """One scoring model of the detector (see the module docstring).

    Class attributes: ``name`` (registry key, stored in model files as ``spatial_choice``), ``has_lam_rel`` (the
    model has a ridge strength lam_rel: ``lam_rel`` / ``set_lam_rel``; without one the detector's lam_rel option
    must stay "auto"), ``selectable`` (takes part in the label-free choice: gives a ``candidate``) and ``derives``
    (the names of models this one's fit also gives, exactly, through ``derive``: the local model's pooled
    statistics are the global model's).
    """

    name: ClassVar[str]
    has_lam_rel: ClassVar[bool] = False
    selectable: ClassVar[bool] = False
    derives: ClassVar[tuple[str, ...]] = ()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def create(cls, options: Mapping[str, Any]) -> "ScoringModel":
        """An unfitted model with the detector's options (its config as a dict, ``lam_rel`` a number)."""

    @abstractmethod
    def fresh(self) -> "ScoringModel":
        """An unfitted model with this one's options now (for shards, held-out parts and refits)."""

    # ---- fitting ----------------------------------------------------------------------------------
    @abstractmethod
    def partial_fit(self, grids: torch.Tensor) -> None:
        """Add (B, P, d) patch grids of normal images (one row of P patches per image)."""

    @abstractmethod
    def merge(self, other: "ScoringModel") -> "ScoringModel":
        """Add the fit of ``other`` (same class and options, other images) into this one; returns self."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether the model can score."""

    @property
    @abstractmethod
    def n_patches(self) -> int:
        """Training patches seen (0 before any fit)."""

    @property
    @abstractmethod
    def dim(self) -> Optional[int]:
        """d, the patch dimension (None before any fit)."""

    @property
    def positions(self) -> Optional[int]:
        """P, the patch positions the model is tied to (None: it scores any grid)."""
        return None

    def derive(self, name: str) -> "ScoringModel":
        """The fitted model ``name`` (one of ``derives``) of the same images, from this model's statistics."""
        raise ValueError(f"the {self.name!r} model gives no {name!r} model")

    # ---- options ----------------------------------------------------------------------------------
    @property
    def lam_rel(self) -> Optional[float]:
        """The ridge strength relative to the mean eigenvalue, where the model has one (None otherwise)."""
        return None

    def set_lam_rel(self, value: float) -> None:
        """Use another lam_rel (no refit)."""
        raise ValueError(f"the {self.name!r} scoring model has no lam_rel")

    def options(self) -> dict[str, Any]:
        """The detector options (config keys) this model holds now, as they are now (e.g. after ``set_lam_rel``)."""
        return {} if self.lam_rel is None else {"lam_rel": self.lam_rel}

    # ---- scoring ----------------------------------------------------------------------------------
    @abstractmethod
    def head(self, layout: FeatureLayout, use_fused: bool = True) -> nn.Module:
        """The fitted model as a ``ScoreHead`` module (float32 buffers) for feature maps of ``layout``."""

    @abstractmethod
    def cache_key(self) -> Hashable:
        """A value that changes whenever the scores would (new data, new options): heads are rebuilt on change."""

    def export_head(self, layout: FeatureLayout, rank: Optional[int] = None) -> tuple[nn.Module, dict[str, Any]]:
        """The head an ONNX export traces (``use_fused`` off, on the CPU, eval mode) and what the export metadata
        records about it (``lam``, ``rank``, ``error_bound`` and the model's own facts). ``rank``: a rank-r form,
        where the model has one."""
        if rank is not None:
            raise UnsupportedOption(f"rank={rank}: the {self.name!r} scoring model has no rank-r form")
        head = self.head(layout, use_fused=False).cpu().eval()
        return head, {"lam": self.summary().get("lam"), "rank": None, "error_bound": None}

    # ---- deployment ---------------------------------------------------------------------------------
    def deploy_head(
        self, precision: str, options: Mapping[str, Any], detector: Optional[dict[str, Any]] = None
    ) -> DeployableHead:
        """The model's head file form in storage ``precision`` (``options``: the model's own, e.g. ``rank``);
        ``detector``: the source detector's metadata, recorded in the file."""
        raise UnsupportedOption(f"the {self.name!r} scoring model has no head file form: export the whole model")

    # ---- persistence --------------------------------------------------------------------------------
    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The model file's tensors (final names, the model's own prefix) and top-level metadata fields."""

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], path: PathLike) -> "ScoringModel":
        """Rebuild the model from a model file's tensors and metadata, checking everything it reads
        (``crd_fast.io.model_file.ModelFileError`` naming the file and the problem)."""

    def summary(self) -> dict[str, Any]:
        """What the detector's metadata states at top level: ``lam``, ``lam_rel`` (None where the model has none)
        and ``n_patches``."""
        return {"lam": None, "lam_rel": self.lam_rel, "n_patches": self.n_patches}

    # ---- the label-free choice ----------------------------------------------------------------------
    def candidate(self) -> "Candidate":
        """The fitted model as a candidate of the label-free choice (crd_fast/scoring/candidates.py)."""
        raise ValueError(f"the {self.name!r} scoring model does not take part in the label-free choice")


class ScorerBackedModel(ScoringModel):
    """A scoring model whose fit and lam_rel live in one scorer object (``self.scorer``: a CRDScorer or a
    LocalCRDScorer, with ``merge``, ``is_fitted`` and a settable ``lam_rel``), as both built-in models' do."""

    has_lam_rel = True

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self._seen: Any = None
        self._version = 0

    def _version_of(self, derived: Any) -> int:
        """A counter that moves whenever ``derived`` (an object the scorer rebuilds on every change of data or
        options, e.g. its projection) is a new one: a ``cache_key``. Holding the last one keeps its id unique."""
        if derived is not self._seen:
            self._seen = derived
            self._version += 1
        return self._version

    def merge(self, other: ScoringModel) -> "ScorerBackedModel":
        if type(other) is not type(self):
            raise TypeError(
                f"can only merge a {type(self).__name__} into a {type(self).__name__}, got {type(other).__name__}"
            )
        self.scorer.merge(other.scorer)
        return self

    @property
    def is_fitted(self) -> bool:
        return self.scorer.is_fitted

    @property
    def lam_rel(self) -> float:
        return self.scorer.lam_rel

    def set_lam_rel(self, value: float) -> None:
        self.scorer.lam_rel = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scorer!r})"


__all__ = ["DeployableHead", "FeatureLayout", "ScoreHead", "ScorerBackedModel", "ScoringModel", "UnsupportedOption"]
