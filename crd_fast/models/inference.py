"""InferenceModel: normalised images -> image scores, anomaly maps and patch maps, in one module.

This is what gets exported (ONNX, TorchScript): backbone features, the CRD head and the anomaly mapper.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.precision import head_gemm_dtype
from ..features.backbone import FeatureExtractor
from .anomaly_map import AnomalyMapper


class InferenceModel(nn.Module):
    """extractor + head (any scoring model's head: crd_fast/scoring/base.py ``ScoreHead``) + mapper.

    forward(x: (B, 3, H, W) normalised images) -> (image_scores (B,), anomaly_maps (B, H, W), patch_maps (B, h, w));
    the image score is the largest patch score (before upsampling and blur).
    """

    def __init__(self, extractor: FeatureExtractor, head: nn.Module, mapper: AnomalyMapper) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head
        self.mapper = mapper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        choice = getattr(self.extractor, "precision", None)
        # the CPU head's projection GEMM follows the backbone's precision (crd_fast.core.precision)
        with head_gemm_dtype(None if choice is None else choice.head_gemm_dtype):
            patch_maps = self.head(self.extractor(x))
        anomaly_maps = self.mapper(patch_maps)
        image_scores = patch_maps.flatten(1).amax(dim=1)
        return image_scores, anomaly_maps, patch_maps
