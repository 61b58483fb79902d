"""timm backbones by name: ``backbone="timm:<model name>"`` (optional extra ``crd-fast[timm]``).

    CRDDetector(backbone="timm:convnext_tiny", layers=("stages.1", "stages.2"), weights="imagenet")
    crd-fast fit good/ -o model.crd --backbone timm:resnet18 --weights random

The model is built with ``timm.create_model(name, features_only=True)``. ``layers`` are timm's feature
module names (``model.feature_info.module_name()``: "layer2" for ResNets, "stages.1" for ConvNeXt, ...) or
feature indices as strings ("1", "2"). Images are normalised with the model's own mean and std (its
``pretrained_cfg``), not ImageNet's. Without ``layers``, the two middle feature stages are used
(of timm's n feature stages, indices (n - 1) // 2 and the next: layer2 + layer3 of a ResNet's five, stride 8 and
16; stages.1 + stages.2 of a ConvNeXt's four). ``weights``: "imagenet" (timm's default pretrained weights, from the
Hugging Face cache or a download; offline it fails), "random" (timm's initialisation, seeded) or a
state-dict file of the full model (or of the features-only model).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .backbone import BackboneWeightsError, WeightsSpec, load_state_dict_file

PREFIX = "timm:"


def is_timm(backbone: object) -> bool:
    """Whether ``backbone`` names a timm model ("timm:<name>")."""
    return isinstance(backbone, str) and backbone.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ImportError("timm backbones need timm: pip install 'crd-fast[timm]'") from exc
    return timm


class TimmFeatures(nn.Module):
    """A features-only timm model returning the maps of ``layers`` (None: its two middle feature stages), with the
    model's mean and std; ``self.layers`` names the maps."""

    def __init__(
        self, backbone: str, layers: Optional[Sequence[str]] = None, weights: WeightsSpec = "imagenet", seed: int = 0
    ) -> None:
        super().__init__()
        timm = _timm()
        name = backbone[len(PREFIX) :]
        if not name:
            raise ValueError("a timm backbone needs a model name: 'timm:<name>', e.g. 'timm:resnet18'")
        try:
            probe = timm.create_model(name, pretrained=False, features_only=True)
        except RuntimeError as exc:  # timm's "Unknown model" / "features_only not implemented"
            raise ValueError(f"timm cannot build {name!r} as a feature extractor: {exc}") from exc
        modules = list(probe.feature_info.module_name())
        if layers is None:
            middle = max(0, (len(modules) - 1) // 2)
            layers = tuple(modules[middle : middle + 2])
        self.layers = tuple(layers)
        indices = []
        for layer in layers:
            if layer in modules:
                indices.append(modules.index(layer))
            elif layer.isdigit() and int(layer) < len(modules):
                indices.append(int(layer))
            else:
                raise ValueError(
                    f"unknown layer {layer!r} for {backbone}; choose from {modules} (or indices 0..{len(modules) - 1})"
                )
        pretrained = isinstance(weights, str) and weights == "imagenet"
        random = isinstance(weights, str) and weights == "random"
        if pretrained:
            try:
                model = timm.create_model(name, pretrained=True, features_only=True, out_indices=tuple(indices))
            except Exception as exc:  # no network, no cache, no weights for this model
                raise BackboneWeightsError(
                    f"could not get timm's pretrained weights for {name} ({type(exc).__name__}: {exc}); "
                    "pass a local state-dict file as weights, or weights='random' for tests"
                ) from exc
        else:
            with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's random state
                torch.manual_seed(int(seed))
                model = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(indices))
            if not random:
                if not isinstance(weights, (str, os.PathLike)):
                    raise ValueError(f"weights must be 'imagenet', 'random' or a state-dict file, got {weights!r}")
                state = load_state_dict_file(weights)
                result = model.load_state_dict(state, strict=False)
                if result.missing_keys:
                    missing = result.missing_keys
                    raise BackboneWeightsError(
                        f"{weights}: weights do not match timm {name}: missing "
                        f"{len(missing)} tensor(s) such as {missing[:3]}"
                    )
        cfg = model.pretrained_cfg or {}
        self.model = model.eval()
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))
