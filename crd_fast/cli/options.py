"""Options shared by several commands: detector settings, value checkers and the common flags.

Nothing here imports torch: ``crd-fast --help`` must answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Optional

# Kept in step with crd_fast.features.backbone (checked by tests/test_cli.py), so that building the parser
# does not import torch.
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
             "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
EMBEDDINGS = ("concat", "patchcore")


def wrap(text: str, width: int = 100) -> str:
    """A command's description as wrapped lines (the raw formatter, kept for the epilogs, does not wrap)."""
    import textwrap

    return textwrap.fill(" ".join(text.split()), width)


class CLIError(Exception):
    """A user mistake found by the command line itself (exit code 2)."""


# ---- argparse type checkers: a bad value becomes "argument --x: ..." and exit code 2 ----------------------
def _number_type(convert: Callable[[str], Any], accept: Callable[[Any], bool], expectation: str, name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``convert`` and refuses values ``accept`` rejects."""

    def check(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text!r}")
        return value

    check.__name__ = name
    return check


positive_int = _number_type(int, lambda v: v >= 1, "a positive integer", "positive_int")
non_negative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0", "non_negative_int")
positive_float = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number", "positive_float")
finite_float = _number_type(float, math.isfinite, "a finite number", "finite_float")
fraction = _number_type(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", "fraction")
probability = _number_type(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "probability")


def layer_list(text: str) -> tuple[str, ...]:
    """'layer2,layer3' -> ('layer2', 'layer3')."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated layer names, e.g. layer2,layer3")
    bad = [n for n in names if n not in LAYERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown layer(s) {', '.join(bad)}; choose from {', '.join(LAYERS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"layers must not repeat, got {text!r}")
    return names


def weights_spec(text: str) -> str:
    """'imagenet', 'random' or the path of an existing state-dict file."""
    if text in ("imagenet", "random"):
        return text
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither 'imagenet', 'random' nor an existing weights file (safetensors or .pth)")
    return text


# ---- option groups ------------------------------------------------------------------------------------
def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--debug, --no-progress and --threads, on every command (a flag the command defines itself is kept)."""
    flags = [
        (("--debug",), dict(action="store_true", help="show the full traceback when something fails")),
        (("--no-progress",), dict(action="store_true", help="no progress bars (e.g. in logs)")),
        (("--threads",), dict(type=positive_int, metavar="N",
                              help="CPU threads for PyTorch (default: PyTorch's choice; 1 helps on a busy shared machine)")),
    ]
    for names, kwargs in flags:
        if not any(n in parser._option_string_actions for n in names):  # argparse has no public "has option"
            parser.add_argument(*names, **kwargs)


def apply_common_flags(args: argparse.Namespace) -> None:
    """Settings that take effect before the command runs."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_detector_options(parser: argparse.ArgumentParser, backbone: str = "wide_resnet50_2",
                         weights: str = "imagenet", batch_size: int = 8, resize: Optional[int] = 256,
                         crop: Optional[int] = 224, size_note: str = "") -> None:
    """The CRDDetector settings (fit, eval, demo). Defaults may differ per command (the demo's are small);
    ``resize``/``crop`` None: the command fills them in (``size_note`` tells the user how)."""
    g = parser.add_argument_group("detector options")
    g.add_argument("--backbone", choices=BACKBONES, default=backbone, metavar="NAME",
                   help=f"torchvision ResNet feature extractor: {', '.join(BACKBONES)} (default: {backbone})")
    g.add_argument("--weights", type=weights_spec, default=weights, metavar="W",
                   help="backbone weights: 'imagenet' (torchvision's; needs its cache or a network), 'random' "
                        "(seeded, for tests: not real accuracy) or PATH to a state-dict file "
                        f"(default: {weights})")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of random weights (default: 0)")
    g.add_argument("--layers", type=layer_list, default=("layer2", "layer3"), metavar="L1,L2",
                   help="backbone layers whose features are used (default: layer2,layer3)")
    g.add_argument("--embedding", choices=EMBEDDINGS, default="concat",
                   help="concat: all channels (d = 1536 for wide_resnet50_2); patchcore: reduced to 1024 "
                        "(default: concat)")
    g.add_argument("--lam-rel", type=positive_float, default=None, metavar="X",
                   help="CRD regularisation relative to the mean feature variance (default: the package's, "
                        "crd_fast.DEFAULT_LAM_REL)")
    g.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract the mean patch before projecting (default: --center)")
    g.add_argument("--rank", type=positive_int, default=None, metavar="R",
                   help="keep only the R strongest directions of the CRD projection (default: exact, full rank)")
    g.add_argument("--resize", type=positive_int, default=resize, metavar="PX",
                   help=f"shorter image side after resizing (default: {resize if resize else size_note})")
    g.add_argument("--crop", type=positive_int, default=crop, metavar="PX",
                   help=f"center crop the model sees; anomaly maps have this size (default: {crop if crop else size_note})")
    add_runtime_options(g, batch_size)


def add_runtime_options(group: Any, batch_size: Optional[int] = 8) -> None:
    """--device and --batch-size (also on predict, where they override what the model file says)."""
    group.add_argument("--device", default=None if batch_size is None else "cpu", metavar="DEV",
                       help="cpu, cuda, cuda:N or auto" + ("" if batch_size is None else " (default: cpu)"))
    group.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N",
                       help="images per forward pass" + ("" if batch_size is None else f" (default: {batch_size})"))


def detector_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """CRDDetector keyword arguments from parsed detector options."""
    kwargs: dict[str, Any] = {
        "backbone": args.backbone, "weights": args.weights, "seed": args.seed, "layers": tuple(args.layers),
        "embedding": args.embedding, "center": args.center, "rank": args.rank, "resize": args.resize,
        "crop": args.crop, "device": args.device, "batch_size": args.batch_size,
    }
    if args.lam_rel is not None:
        kwargs["lam_rel"] = args.lam_rel
    return kwargs


def make_detector(args: argparse.Namespace, **override: Any) -> Any:
    """Build the CRDDetector the options describe (imports torch)."""
    from ..detector.detector import CRDDetector

    return CRDDetector(**{**detector_kwargs(args), **override})


def progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def echo(*parts: Any) -> None:
    """Results go to stdout (progress bars and warnings go to stderr)."""
    print(*parts, flush=True)


def warn(message: str) -> None:
    import sys

    print(f"crd-fast: warning: {message}", file=sys.stderr, flush=True)


Runner = Callable[[argparse.Namespace], int]
