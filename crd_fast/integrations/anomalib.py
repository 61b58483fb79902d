"""CRD as an anomalib 2.x model (optional extra ``crd-fast[anomalib]``): ``Crd`` next to Padim and Patchcore.

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from crd_fast.integrations.anomalib import Crd
    model, datamodule = Crd(backbone="wide_resnet50_2"), MVTecAD(category="bottle")
    engine = Engine()
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule)

``Crd`` takes the detector's options (``CRDDetector``, crd_fast/detector/config.py) with the detector's defaults:
``spatial`` ("global", "local", any registered scoring model, or "auto"), ``lam_rel`` (a number or "auto"),
``local_rank``, ``local_shrinkage`` and ``center``. ``CrdModel`` (the torch model) fits the scoring model those
options name (crd_fast/scoring: the same ``ScoringModel`` interface and registry the detector uses) from the
training batches anomalib gives, in one pass; with "auto" it hands the stream to the detector's
``LabelFreeSelector`` (crd_fast/selection), which holds out a few images, paints pseudo-defects on them and
chooses the model and lam_rel as the detector does (fewer than 20 training images: the global CRD at lam_rel 0.01).
The record is ``CrdModel.selection``.

Checkpoints hold the fitted scoring model (its float64 statistics and everything it saves in a model file, as
``model.scoring.*`` tensors plus its fields, the choice and the patch grid in the module's extra state) and the
head, so a reloaded model scores exactly as before, and training it on more images adds them to the same model (as
``CRDDetector.partial_fit`` does: the choice is kept). The head is rebuilt from the scoring model at the end of
each training epoch.

Images arrive as anomalib's pre-processor leaves them: resized and normalised with ImageNet's mean and std, as the
torchvision backbones expect (the pseudo-defects of the label-free choice are painted on the pictures that
normalisation gives back). The image score is the largest patch score; the anomaly map is the patch map upsampled
to the input size and blurred (``crd_fast.models.anomaly_map``), as in ``CRDDetector``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.post_processing import PostProcessor
from torch import nn

from ..choices import DEFAULT_LAM_REL, LAM_AUTO
from ..core.embedding import embed_patches, embedding_dim, patch_grids
from ..detector.config import DEFAULTS, DetectorConfig
from ..detector.open_models import check_open_models, label_free_selector, lam_grid, settled_model
from ..features.backbone import FeatureExtractor
from ..models.anomaly_map import AnomalyMapper
from ..scoring.base import FeatureLayout, ScoringModel
from ..scoring.registry import AUTO, model_class
from ..selection.plan import MIN_IMAGES
from ..selection.record import SelectionRecord
from ..selection.selector import LabelFreeSelector

logger = logging.getLogger(__name__)

__all__ = ["Crd", "CrdModel"]

#: The state-dict prefix of the scoring model's tensors (inside the CrdModel's own prefix).
SCORING_PREFIX = "scoring."
#: The state-dict key (inside the CrdModel's prefix) of the scoring model's name and fields, and what they say.
EXTRA_STATE = "_extra_state"
STATE_FORMAT, STATE_VERSION = "crd-fast-anomalib", 1


class _FitPass:
    """One pass over training batches: into a scoring model (an update of a fitted one, or a fit with fixed options),
    or into the label-free selector."""

    def __init__(self, model: Optional[ScoringModel] = None, selector: Optional[LabelFreeSelector] = None) -> None:
        self.model, self.selector, self.images = model, selector, 0

    def add(self, x: torch.Tensor, grids: torch.Tensor) -> None:
        if self.selector is not None:
            self.selector.add(x, grids)
        else:
            self.model.partial_fit(grids)
        self.images += int(x.shape[0])

    def finish(
        self, embed: Callable[[torch.Tensor], torch.Tensor], mean: Sequence[float], std: Sequence[float], grid: Any
    ) -> tuple[ScoringModel, Optional[SelectionRecord]]:
        if self.images == 0:
            raise RuntimeError("CrdModel has seen no training images: train it before fitting")
        if self.selector is not None:
            return self.selector.finish(embed, mean, std, grid)
        return self.model, None


class CrdModel(nn.Module):
    """Backbone features -> patch scores of a scoring model (crd_fast/scoring) chosen and fitted as the detector does.

    In training mode ``forward`` streams the batch's patch grids into the fit (and returns the embeddings); ``fit``
    ends the pass and builds the head. In eval mode ``forward`` returns an ``InferenceBatch`` (pred_score (B,),
    anomaly_map (B, 1, H, W)). The options are ``DetectorConfig``'s (checked by it); ``pre_trained`` stands for
    ``weights="imagenet"`` (True) or ``"random"`` (seeded by ``seed``; for tests only).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        lam_rel: Any = DEFAULTS["lam_rel"],
        center: bool = True,
        blur_sigma: float = 4.0,
        seed: int = 0,
        *,
        spatial: str = DEFAULTS["spatial"],
        local_rank: int = DEFAULTS["local_rank"],
        local_shrinkage: float = DEFAULTS["local_shrinkage"],
    ) -> None:
        super().__init__()
        self.config = DetectorConfig(
            backbone=backbone,
            weights="imagenet" if pre_trained else "random",
            layers=tuple(layers),
            lam_rel=lam_rel,
            center=center,
            seed=seed,
            blur_sigma=blur_sigma,
            spatial=spatial,
            local_rank=local_rank,
            local_shrinkage=local_shrinkage,
        )
        check_open_models(self.config.to_dict())  # an option no open model takes fails here, as in the detector
        self.extractor = FeatureExtractor(backbone, self.config.layers, self.config.weights, seed)
        self.layer_channels = [c for c, _, _ in self.extractor.feature_shapes(64)]
        self.dim = embedding_dim(self.layer_channels, self.config.embedding, self.config.target_dim)
        #: The fitted scoring model (None before the first fit).
        self.scoring: Optional[ScoringModel] = None
        #: The label-free choice's record (None where nothing was chosen).
        self.selection: Optional[SelectionRecord] = None
        #: The (h, w) patch grid of the training images (set by the first training batch).
        self.patch_grid: Optional[tuple[int, int]] = None
        self.n_images = 0
        self.head: Optional[nn.Module] = None
        self._pass: Optional[_FitPass] = None

    @property
    def blur_sigma(self) -> float:
        return self.config.blur_sigma

    def train(self, mode: bool = True) -> "CrdModel":
        super().train(mode)
        self.extractor.eval()  # the backbone is frozen: BatchNorm must keep its running statistics
        return self

    @property
    def layout(self) -> FeatureLayout:
        if self.patch_grid is None:
            raise RuntimeError("CrdModel has seen no training images: train it before fitting")
        return FeatureLayout(self.config.embedding, self.config.target_dim, tuple(self.layer_channels), self.patch_grid)

    def _device(self) -> torch.device:
        return next(self.extractor.parameters()).device

    # ---- fitting ----------------------------------------------------------------------------------
    def begin_fit(self, count: Optional[int] = None) -> None:
        """Start a pass over training images (``count``: how many, when known; it spaces the held-out images of the
        label-free choice evenly). A fitted model adds them to its scoring model and keeps its choice; otherwise
        they fit the model the options name, or, where lam_rel or spatial is "auto", the label-free choice among the
        open models (fewer than 20 images: the defaults, without a choice). Training batches start one if needed."""
        if self.scoring is not None and self.scoring.is_fitted:
            self._pass = _FitPass(model=self.scoring)
            return
        options, grid = self.config.to_dict(), lam_grid(self.config.lam_rel)
        self.selection, self.n_images = None, 0
        if not self._choosing():
            lam = grid[0] if len(grid) == 1 else DEFAULT_LAM_REL  # a model without lam_rel ignores it
            self._pass = _FitPass(model=model_class(self.config.spatial).create({**options, "lam_rel": lam}))
        elif count is not None and count < MIN_IMAGES:
            model, self.selection = settled_model(options, grid, count)
            self._pass = _FitPass(model=model)
        else:
            self._pass = _FitPass(selector=label_free_selector(options, grid, count, self.config.seed))

    def _choosing(self) -> bool:
        """Whether a fit from empty chooses (as ``CRDDetector.selection_pending``): spatial "auto", or lam_rel "auto"
        for a model that has one."""
        if self.config.spatial == AUTO:
            return True
        return self.config.lam_rel == LAM_AUTO and model_class(self.config.spatial).has_lam_rel

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) patch embeddings of a normalised batch; sets the patch grid."""
        with torch.no_grad():
            embeddings = embed_patches(self.extractor(x), self.config.embedding, self.config.target_dim)
        self.patch_grid = (int(embeddings.shape[2]), int(embeddings.shape[3]))
        return embeddings

    def _cpu_grids(self, x: torch.Tensor) -> torch.Tensor:
        """(n, P, d) float32 CPU patch grids of normalised CPU inputs (the pseudo-defects' forward passes)."""
        device, step = self._device(), 8
        return torch.cat(
            [patch_grids(self._embed(x[i : i + step].to(device))).float().cpu() for i in range(0, x.shape[0], step)]
        )

    def add_training_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Stream a normalised batch of defect-free images into the open pass (started here if none is); returns
        their (B, d, h, w) patch embeddings."""
        if self._pass is None:
            self.begin_fit()
        embeddings = self._embed(images)
        self._pass.add(images, patch_grids(embeddings))
        return embeddings

    def fit(self) -> None:
        """End the pass over the training images (if one is open) and build the head from the scoring model."""
        if self._pass is not None:
            fit_pass, self._pass = self._pass, None
            model, record = fit_pass.finish(self._cpu_grids, self.extractor.mean, self.extractor.std, self.patch_grid)
            if record is not None:  # a pass without a choice keeps the record it has (an update, or too few images)
                self.selection = record
            self.scoring = model
            self.n_images += fit_pass.images
        if self.scoring is None or not self.scoring.is_fitted:
            raise RuntimeError("CrdModel has seen no training images: train it before fitting")
        self.head = self.scoring.head(self.layout).to(self._device())
        logger.info(
            "CRD head (%s, lam_rel %s) built from %d images, %d patches (d=%d)",
            self.scoring.name,
            self.scoring.lam_rel,
            self.n_images,
            self.scoring.n_patches,
            self.dim,
        )

    # ---- checkpoints ------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # The scoring model's tensors under "scoring.", and beside them (as the module's extra state) its name and
        # fields, the record of the choice and the patch grid.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        tensors, fields = self.scoring.state() if self.scoring is not None and self.scoring.is_fitted else ({}, None)
        for name, tensor in tensors.items():
            destination[prefix + SCORING_PREFIX + name] = tensor
        destination[prefix + EXTRA_STATE] = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "spatial": None if fields is None else self.scoring.name,
            "fields": fields,
            "selection": None if self.selection is None else self.selection.to_dict(),
            "patch_grid": None if self.patch_grid is None else list(self.patch_grid),
            "n_images": self.n_images,
        }

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # The scoring model and the head are rebuilt from the saved tensors and fields before the children (the head
        # among them) load theirs: a reloaded model then holds the very buffers it saved.
        tensors = {
            key[len(prefix + SCORING_PREFIX) :]: state_dict.pop(key)
            for key in [k for k in state_dict if k.startswith(prefix + SCORING_PREFIX)]
        }
        self._restore(state_dict.pop(prefix + EXTRA_STATE, None), tensors)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _restore(self, state: Any, tensors: dict[str, torch.Tensor]) -> None:
        where = "CrdModel checkpoint"
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            found = (state.get("format"), state.get("version")) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{where}: holds no {STATE_FORMAT} state of version {STATE_VERSION} (found {found}); a checkpoint "
                "of another crd-fast version cannot be read: fit the model again"
            )
        self._pass = None
        self.n_images = int(state.get("n_images") or 0)
        grid = state.get("patch_grid")
        self.patch_grid = None if grid is None else (int(grid[0]), int(grid[1]))
        record = state.get("selection")
        self.selection = None if record is None else SelectionRecord.from_dict(record)
        if state.get("spatial") is None:
            self.scoring, self.head = None, None
            return
        self.scoring = model_class(state["spatial"]).from_state(tensors, state["fields"], where)
        self.head = self.scoring.head(self.layout).to(self._device())

    # ---- scoring ----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        if self.training:
            return self.add_training_batch(images)
        if self.head is None:
            raise RuntimeError("CrdModel is not fitted: train it, then call fit()")
        with torch.no_grad():
            features = self.extractor(images)
        patch_maps = self.head(features)
        mapper = AnomalyMapper(tuple(int(s) for s in images.shape[-2:]), self.blur_sigma).to(patch_maps.device)
        anomaly_map = mapper(patch_maps).unsqueeze(1)
        return InferenceBatch(pred_score=patch_maps.flatten(1).amax(dim=1), anomaly_map=anomaly_map)


def _training_images(trainer: Any) -> Optional[int]:
    """How many training images the trainer's loader holds, when that is known."""
    try:
        return len(trainer.train_dataloader.dataset)
    except (AttributeError, TypeError):
        return None


class Crd(MemoryBankMixin, AnomalibModule):
    """The Collaborative Representation Distance as an anomalib model (one pass over the training set).

    Args:
        backbone, layers: torchvision ResNet and its stages (as for ``CRDDetector``).
        pre_trained: ImageNet weights (True) or seeded random weights (False; for tests only).
        lam_rel: the ridge strength relative to the mean eigenvalue, or "auto" (the default: chosen without labels).
        center: subtract the mean patch (the global CRD's option).
        blur_sigma: Gaussian blur of the anomaly maps in pixels.
        spatial: the scoring model: "global" (textures), "local" (aligned parts), a registered model, or "auto" (the
            default: chosen with lam_rel without labels).
        local_rank, local_shrinkage: the local model's rank k and shrinkage toward the pooled covariance.
        seed: seed of random weights and of the pseudo-defects.
        pre_processor, post_processor, evaluator, visualizer: as for every anomalib model.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        lam_rel: Any = DEFAULTS["lam_rel"],
        center: bool = True,
        blur_sigma: float = 4.0,
        *,
        spatial: str = DEFAULTS["spatial"],
        local_rank: int = DEFAULTS["local_rank"],
        local_shrinkage: float = DEFAULTS["local_shrinkage"],
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,
        visualizer: Any = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.model: CrdModel = CrdModel(
            backbone,
            layers,
            pre_trained,
            lam_rel,
            center,
            blur_sigma,
            seed,
            spatial=spatial,
            local_rank=local_rank,
            local_shrinkage=local_shrinkage,
        )

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing to optimise: fitting is one pass of statistics."""
        return

    def on_train_epoch_start(self) -> None:
        # New training data (also after reloading a checkpoint) is added to the fitted model; refit afterwards.
        self._is_fitted = torch.tensor([False], device=self.device)
        self.model.begin_fit(_training_images(self.trainer))

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor:
        del args, kwargs
        self.model.add_training_batch(batch.image)  # whatever mode Lightning left the module in
        return torch.tensor(0.0, requires_grad=True, device=self.device)  # Lightning wants a loss

    def fit(self) -> None:
        self.model.fit()

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"max_epochs": 1, "val_check_interval": 1.0, "num_sanity_val_steps": 0, "devices": 1}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        return PostProcessor()
