"""CRD as an anomalib 2.x model (optional extra ``crd-fast[anomalib]``): ``Crd`` next to Padim and Patchcore.

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from crd_fast.integrations.anomalib import Crd
    engine = Engine()
    engine.fit(model=Crd(backbone="wide_resnet50_2"), datamodule=MVTecAD(category="bottle"))
    engine.test(model=model, datamodule=datamodule)

``CrdModel`` (the torch model) keeps the CRD's float64 sufficient statistics (patch count, mean and
scatter) as buffers, so they are in every checkpoint: a reloaded model scores exactly as before, and
training it on more images adds them to the same statistics (as ``CRDScorer.partial_fit`` does), giving
the model one fit on all the images would. The CRD head (the float32 projection used at inference)
is a buffer too, rebuilt from the statistics at the end of each training epoch.

Images arrive normalised by anomalib's pre-processor (ImageNet mean and std, as the torchvision
backbones expect). The image score is the largest patch score; the anomaly map is the patch map
upsampled to the input size and blurred (``crd_fast.models.anomaly_map``), as in ``CRDDetector``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.post_processing import PostProcessor
from torch import nn

from ..core.embedding import embed_patches, patch_matrix
from ..core.stats import PatchStatistics
from ..features.backbone import FeatureExtractor
from ..models.anomaly_map import AnomalyMapper
from ..models.head import CRDHead
from ..scorers.crd import DEFAULT_LAM_REL, CRDScorer

logger = logging.getLogger(__name__)

__all__ = ["Crd", "CrdModel"]


class CrdModel(nn.Module):
    """Backbone features -> CRD patch scores, with the float64 statistics as buffers.

    In training mode ``forward`` adds the batch's patches to the statistics (and returns the embeddings);
    in eval mode it returns an ``InferenceBatch`` (pred_score (B,), anomaly_map (B, 1, H, W)).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        lam_rel: float = DEFAULT_LAM_REL,
        center: bool = True,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, tuple(layers), "imagenet" if pre_trained else "random", seed)
        self.lam_rel, self.center, self.blur_sigma = float(lam_rel), bool(center), float(blur_sigma)
        self.layer_channels = [c for c, _, _ in self.extractor.feature_shapes(64)]
        d = sum(self.layer_channels)
        self.register_buffer("crd_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("crd_mean", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("crd_scatter", torch.zeros(d, d, dtype=torch.float64))
        self.head = CRDHead(
            torch.zeros(d, d, dtype=torch.float64),
            torch.zeros(d, dtype=torch.float64),
            "concat",
            layer_channels=self.layer_channels,
        )

    @property
    def dim(self) -> int:
        return int(self.crd_mean.shape[0])

    def train(self, mode: bool = True) -> "CrdModel":
        super().train(mode)
        self.extractor.eval()  # the backbone is frozen: BatchNorm must keep its running statistics
        return self

    @property
    def statistics(self) -> PatchStatistics:
        """The buffers as ``PatchStatistics`` (a copy)."""
        return PatchStatistics.from_tensors(int(self.crd_count), self.crd_mean, self.crd_scatter)

    def update(self, embeddings: torch.Tensor) -> None:
        """Add (B, d, h, w) patch embeddings to the float64 statistics."""
        stats = self.statistics.update(patch_matrix(embeddings))
        self.crd_count.fill_(stats.count)
        self.crd_mean.copy_(stats.mean)
        self.crd_scatter.copy_(stats.scatter)

    def scorer(self) -> CRDScorer:
        """A ``CRDScorer`` over the current statistics."""
        if int(self.crd_count) < 2:
            raise RuntimeError("CrdModel has seen fewer than 2 patches: train it before fitting")
        return CRDScorer.from_statistics(self.statistics, self.lam_rel, self.center)

    def fit(self) -> None:
        """Rebuild the CRD head (projection) from the statistics."""
        head = CRDHead.from_scorer(self.scorer(), "concat", layer_channels=self.layer_channels)
        self.head.load_state_dict(head.state_dict())
        logger.info("CRD head rebuilt from %d patches (d=%d)", int(self.crd_count), self.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        with torch.no_grad():
            features = self.extractor(images)
        if self.training:
            embeddings = embed_patches(features, "concat")
            self.update(embeddings)
            return embeddings
        patch_maps = self.head(features)
        mapper = AnomalyMapper(tuple(int(s) for s in images.shape[-2:]), self.blur_sigma).to(patch_maps.device)
        anomaly_map = mapper(patch_maps).unsqueeze(1)
        return InferenceBatch(pred_score=patch_maps.flatten(1).amax(dim=1), anomaly_map=anomaly_map)


class Crd(MemoryBankMixin, AnomalibModule):
    """The Collaborative Representation Distance as an anomalib model (one pass over the training set).

    Args:
        backbone, layers: torchvision ResNet and its stages (as for ``CRDDetector``).
        pre_trained: ImageNet weights (True) or seeded random weights (False; for tests only).
        lam_rel, center: the CRD's options (see ``CRDScorer``).
        blur_sigma: Gaussian blur of the anomaly maps in pixels.
        pre_processor, post_processor, evaluator, visualizer: as for every anomalib model.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        lam_rel: float = DEFAULT_LAM_REL,
        center: bool = True,
        blur_sigma: float = 4.0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,
        visualizer: Any = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.model: CrdModel = CrdModel(backbone, layers, pre_trained, lam_rel, center, blur_sigma)

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing to optimise: fitting is one pass of statistics."""
        return

    def on_train_epoch_start(self) -> None:
        # New training data (also after reloading a checkpoint) is added to the statistics; refit afterwards.
        self._is_fitted = torch.tensor([False], device=self.device)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor:
        del args, kwargs
        self.model(batch.image)
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
