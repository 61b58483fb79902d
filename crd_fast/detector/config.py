"""DetectorConfig: every option of a CRDDetector, written once (torch-free).

``CRDDetector(...)`` takes these fields (by keyword, or positionally in this order), ``CRDDetector.config``
is their ``to_dict()``, ``CRDDetector.load`` rebuilds and checks them, and the command line builds its
detector options from them. Each field carries its one-line help, its validator, and whether it is a
run-time choice (how to run a model, not what the model is: ``load`` accepts other values for those).
Nothing here imports torch, so ``crd-fast --help`` can read it at once.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional

import numpy as np

from ..choices import (
    DEFAULT_BACKBONE,
    DEFAULT_LOCAL_RANK,
    DEFAULT_LOCAL_SHRINKAGE,
    DEFAULT_PRECISION,
    DEFAULT_SPATIAL,
    EMBEDDINGS,
    LAM_AUTO,
    MAX_BATCH_SIZE,
    MAX_DIM,
    MAX_IMAGE_SIDE,
    MAX_SEED,
    PRECISIONS,
    WEIGHT_SOURCES,
    default_layers,
)
from ..scoring.registry import check_spatial

Check = Callable[[str, Any], Any]


def _int_in(minimum: int, maximum: int, shown_max: str = "") -> Check:
    """An integer in [minimum, maximum]: the range the model-file loader accepts (crd_fast.choices)."""

    def check(name: str, value: Any) -> int:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise ValueError(f"{name} must be an integer in [{minimum}, {shown_max or maximum}], got {value!r}")
        return int(value)

    return check


def _flag(name: str, value: Any) -> bool:
    """Only True or False (numpy's too): ``center="no"`` would be truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


#: Device names the detector runs on ("cuda:N" for the N-th GPU).
_DEVICE = re.compile(r"(cpu|cuda|auto|cuda:\d+)")


def _device(name: str, value: Any) -> str:
    text = str(value)  # a torch.device prints as its name
    if not _DEVICE.fullmatch(text):
        raise ValueError(f"{name} must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {value!r}")
    return text


def _non_negative_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _lam_rel(name: str, value: Any) -> Any:
    if isinstance(value, str) and value == LAM_AUTO:
        return LAM_AUTO
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number or {LAM_AUTO!r}, got {value!r}")
    return float(value)


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _optional_rank(name: str, value: Any) -> Optional[int]:
    if value is not None and (
        not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= MAX_DIM
    ):
        raise ValueError(f"{name} must be an integer in [1, {MAX_DIM}] or None, got {value!r}")
    return None if value is None else int(value)


def _embedding(name: str, value: Any) -> str:
    if value not in EMBEDDINGS:
        raise ValueError(f"{name} must be one of {EMBEDDINGS}, got {value!r}")
    return value


def _layers(name: str, value: Any) -> Optional[tuple]:
    # The names are checked against the backbone by the feature extractor (a user module labels them freely);
    # None is the backbone's own pair, filled in by __post_init__.
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _weights(name: str, value: Any) -> Optional[str]:
    if value is None:  # a user module's (checked in __post_init__)
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name} must be 'imagenet', 'random' or a path to a state-dict file, got {value!r}")
    return value if value in WEIGHT_SOURCES else os.fspath(value)


def _precision(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{name} must be one of {PRECISIONS}, got {value!r}")
    return value


def _as_is(name: str, value: Any) -> Any:
    return value


def _option(default: Any, help: str, check: Check = _as_is, runtime: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "check": check, "runtime": runtime})


@dataclass(frozen=True)
class DetectorConfig:
    """The options of a CRDDetector; validated when made (``ValueError`` names the bad option).

    Args:
        backbone: a name of ``BACKBONES`` (torchvision ResNets such as "wide_resnet50_2" or "resnet18", "vgg16",
            "efficientnet_lite0"), "timm:<name>", or an ``nn.Module`` returning a list of (B, C, H, W) feature maps
            (``weights`` is then None and ``layers`` only labels its maps).
        weights: "imagenet" (torchvision's, from the hub cache or a download, no fallback; efficientnet_lite0's
            packaged with crd-fast's dependencies, no download), a path to a state-dict file (safetensors or .pth),
            "hed" (vgg16 only) or "random" (seeded by ``seed``; not real accuracy).
        layers: backbone stages whose maps are used; the first sets the patch grid. Unset (None): the backbone's own
            pair (``DEFAULT_LAYERS`` in crd_fast/choices.py; a timm model's two middle stages, filled in when the
            detector builds it). An explicit value always wins.
        embedding: "concat" (d = sum of channels) or "patchcore" (d = ``target_dim``).
        lam_rel: the CRD ridge strength relative to the mean eigenvalue of the covariance (see ``CRDScorer``), or
            "auto" (the default): chosen from ``DEFAULT_LAM_GRID`` without labels, on held-out training images
            with pseudo-defects (crd_fast/selection; docs/DESIGN.md "Position-aware CRD").
        center, rank: the global CRD scorer's options (see ``CRDScorer``).
        resize, crop: preprocessing (shorter side resized to ``resize``, center crop ``crop``).
        device: "cpu", "cuda", "cuda:N" or "auto" (run-time option).
        batch_size: images per forward pass (run-time option).
        seed: seed of random weights and of the training score sample.
        blur_sigma: Gaussian blur of the anomaly maps, in pixels (0: none).
        target_dim: d of the "patchcore" embedding.
        precision: "fp32", "bf16", "fp16" or "auto" (bf16 where the hardware has it natively and, on a CPU, it
            measured faster than float32; else fp32): how
            the backbone and the CPU head's projection GEMM compute, in fit and predict alike; the statistics
            stay float64 (run-time option; docs/DESIGN.md "Compute precision").
        spatial: the scoring model (crd_fast/scoring): "global" (one mean and covariance for every patch position:
            the paper's CRD, for textures), "local" (a mean per position and a per-position covariance part, for
            aligned parts), any registered model's name, or "auto" (the default: chosen with lam_rel by the same
            label-free validation).
        local_rank: k, the rank of each position's own covariance part in the local model.
        local_shrinkage: a in [0, 1], how far each position's covariance is shrunk toward the pooled one.

    ``device`` is checked against the machine by the detector, backbone and layer names by the feature
    extractor; everything else here. Each field's ``help`` metadata is its one-line form (command line).
    """

    # EfficientNet-Lite0 with its packaged ImageNet weights: the learned backbone that works offline, and the best
    # of those measured on real parts (bench/RESULTS.md "EfficientNet-Lite0 with ImageNet weights from the registry")
    backbone: Any = _option(DEFAULT_BACKBONE, "feature extractor network")
    weights: Optional[str] = _option(
        "imagenet",
        "backbone weights: 'imagenet' (torchvision's: needs its cache or a network; efficientnet_lite0's: from the "
        "packages crd-fast depends on), 'random' "
        "(seeded, for tests: not real accuracy) or the path of a state-dict file (safetensors or .pth)",
        _weights,
    )
    layers: Optional[tuple[str, ...]] = _option(
        None,
        "backbone layers whose features are used; the first sets the patch grid",
        _layers,
    )
    embedding: str = _option(
        "concat", "concat: all channels of the layers; patchcore: reduced to target_dim", _embedding
    )
    lam_rel: Any = _option(
        LAM_AUTO,
        "CRD regularisation relative to the mean feature variance, or auto (chosen without labels on held-out "
        "training images with pseudo-defects)",
        _lam_rel,
    )
    center: bool = _option(True, "subtract the mean patch before projecting", _flag)
    rank: Optional[int] = _option(
        None,
        "keep only the R strongest directions of the CRD projection (unset: exact, full rank)",
        _optional_rank,
    )
    resize: int = _option(256, "shorter image side after resizing", _int_in(1, MAX_IMAGE_SIDE))
    crop: int = _option(224, "center crop the model sees; anomaly maps have this size", _int_in(1, MAX_IMAGE_SIDE))
    device: str = _option("cpu", "cpu, cuda, cuda:N or auto", _device, runtime=True)
    batch_size: int = _option(8, "images per forward pass", _int_in(1, MAX_BATCH_SIZE), runtime=True)
    seed: int = _option(0, "seed of random weights and of the training score sample", _int_in(0, MAX_SEED, "2**63 - 1"))
    blur_sigma: float = _option(4.0, "Gaussian blur of the anomaly maps, in pixels (0: none)", _non_negative_finite)
    target_dim: int = _option(1024, "patch dimension d of the patchcore embedding", _int_in(1, MAX_DIM))
    precision: str = _option(
        DEFAULT_PRECISION,
        "compute precision of the backbone and head: auto (bf16 where the "
        "processor or GPU has it natively and it measured faster, else fp32), fp32, bf16 or fp16",
        _precision,
        runtime=True,
    )
    # Appended after precision: the positional order of the fields above is public.
    spatial: str = _option(
        DEFAULT_SPATIAL,
        "global: one covariance for every patch (textures); local: per-position means and covariances (aligned "
        "parts); auto: chosen with lam_rel without labels",
        check_spatial,
    )
    local_rank: int = _option(
        DEFAULT_LOCAL_RANK, "rank k of each position's own covariance part (spatial local)", _int_in(1, MAX_DIM)
    )
    local_shrinkage: float = _option(
        DEFAULT_LOCAL_SHRINKAGE,
        "shrinkage of each position's covariance toward the pooled one, in [0, 1] (spatial local)",
        _fraction,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        # weights: a source name or a file path for a named backbone; meaningless (None) for a user module.
        if not isinstance(self.backbone, str):
            object.__setattr__(self, "weights", None)
        elif self.weights is None:
            raise ValueError("weights must be 'imagenet', 'random' or a path to a state-dict file, got None")
        if self.layers is None:  # the backbone's own pair (still None for a timm model: its stages decide)
            object.__setattr__(self, "layers", default_layers(self.backbone))

    @property
    def backbone_name(self) -> str:
        """The backbone's name; ``custom:<class name>`` for a user module."""
        return self.backbone if isinstance(self.backbone, str) else f"custom:{type(self.backbone).__name__}"

    def replace(self, **changes: Any) -> "DetectorConfig":
        """A copy with some options changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON values, in field order (the ``config`` a model file stores)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["backbone"] = self.backbone_name
        out["layers"] = None if self.layers is None else list(self.layers)
        return out

    @staticmethod
    def check(name: str, value: Any) -> Any:
        """Option ``name``'s validated, normalised form of ``value`` (ValueError if it is not valid)."""
        return _FIELDS[name].metadata["check"](name, value)

    @staticmethod
    def help(name: str) -> str:
        """The one-line description of option ``name``."""
        return _FIELDS[name].metadata["help"]


_FIELDS = {f.name: f for f in fields(DetectorConfig)}

#: Every option, in the order CRDDetector takes them positionally.
OPTIONS: tuple[str, ...] = tuple(_FIELDS)
#: Options that describe how to run a model, not what it is: ``CRDDetector.load`` accepts other values for them.
RUNTIME_OPTIONS: tuple[str, ...] = tuple(name for name, f in _FIELDS.items() if f.metadata["runtime"])
#: The default of every option.
DEFAULTS: dict[str, Any] = {name: f.default for name, f in _FIELDS.items()}
