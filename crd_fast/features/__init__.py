"""Feature extraction: backbones and preprocessing (docs/DESIGN.md "Pipeline")."""

from ..choices import BACKBONES, RESNETS
from .backbone import (
    BackboneWeightsError,
    FeatureExtractor,
    build_backbone,
    input_normalisation,
    weights_identity,
)
from .preprocess import IMAGE_EXTENSIONS, ImageReadError, Preprocess, load_image, to_unit_tensor

__all__ = [
    "BACKBONES",
    "RESNETS",
    "input_normalisation",
    "BackboneWeightsError",
    "FeatureExtractor",
    "build_backbone",
    "weights_identity",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "Preprocess",
    "load_image",
    "to_unit_tensor",
]
