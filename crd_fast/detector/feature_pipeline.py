"""The detector's feature side, built from its options: backbone extractor, preprocessing and patch-grid layout.

One place turns a :class:`~crd_fast.detector.config.DetectorConfig` into what the detector feeds images through
(the extractor at its compute precision, the backbone's own normalisation) and what its scoring model is sized by
(channels per layer, patch grid, embedding dimension d); and says in one line where the weights came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..core.embedding import embedding_dim
from ..core.precision import PrecisionChoice
from ..features.backbone import FeatureExtractor, module_state_sha256, weights_identity
from ..features.preprocess import Preprocess
from ..features.timm_backbone import TimmFeatures, is_timm
from ..scoring.base import FeatureLayout
from .config import DetectorConfig


@dataclass(frozen=True)
class FeaturePipeline:
    """What :func:`build_feature_pipeline` makes: ``config`` is the options with any default the backbone decides
    filled in (a timm model's stages)."""

    config: DetectorConfig
    extractor: FeatureExtractor
    preprocess: Preprocess
    weights_identity: dict[str, Any]
    layer_channels: list[int]
    patch_grid: tuple[int, int]
    dim: int
    layout: FeatureLayout


def build_feature_pipeline(config: DetectorConfig, device: torch.device, precision: PrecisionChoice) -> FeaturePipeline:
    """The extractor (on ``device``, at ``precision`` for fit and predict alike), preprocessing and layout of
    ``config``'s backbone, layers and embedding."""
    backbone = config.backbone
    if is_timm(backbone):  # "timm:<name>" is built here and used as a module; its name stays
        backbone = TimmFeatures(backbone, config.layers, config.weights, config.seed)
        if config.layers is None:  # its default stages, read from the model: the options record them
            config = config.replace(layers=backbone.layers)
    extractor = FeatureExtractor(backbone, config.layers, config.weights, config.seed).to(device)
    extractor.set_precision(precision)
    # The backbone's own normalisation: ImageNet's for torchvision, the model's for timm or a user module.
    preprocess = Preprocess(config.resize, config.crop, extractor.mean, extractor.std)
    identity = weights_identity(config.weights, config.seed, config.backbone_name)
    if isinstance(config.backbone, nn.Module):  # a user module is identified by its weights
        identity["state_sha256"] = module_state_sha256(config.backbone)
    shapes = extractor.feature_shapes(config.crop)
    channels = [s[0] for s in shapes]
    grid = (shapes[0][1], shapes[0][2])
    dim = embedding_dim(channels, config.embedding, config.target_dim)
    layout = FeatureLayout(config.embedding, config.target_dim, tuple(channels), grid)
    return FeaturePipeline(config, extractor, preprocess, identity, channels, grid, dim, layout)


def describe_weights(identity: dict[str, Any], backbone_name: str) -> str:
    """One line for reports saying where a backbone's weights (``weights_identity``) came from."""
    kind = identity["kind"]
    if kind == "random":
        return (
            f"{backbone_name} with seeded RANDOM weights (seed {identity['seed']}): "
            "scores do not show the accuracy of real (ImageNet) weights"
        )
    if kind == "file":
        return f"{backbone_name} with weights from {identity['file']} (sha256 {identity['sha256'][:12]}...)"
    if kind == "imagenet" and "package" in identity:
        return f"{backbone_name} with ImageNet weights from the {identity['package']} {identity['version']} package"
    if kind == "imagenet":
        return f"{backbone_name} with torchvision ImageNet weights ({identity['name']})"
    return f"{backbone_name} (user module)"


__all__ = ["FeaturePipeline", "build_feature_pipeline", "describe_weights"]
