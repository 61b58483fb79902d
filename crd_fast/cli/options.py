"""Options shared by several commands: detector settings, value checkers and the common flags.

Nothing here imports torch: ``crd-fast --help`` must answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from ..choices import (
    BACKBONES,
    DEFAULT_LAYERS_NOTE,
    EMBEDDINGS,
    LAM_AUTO,
    LAYERS,
    MAX_BATCH_SIZE,
    MAX_DIM,
    MAX_IMAGE_SIDE,
    MAX_SEED,
    PRECISIONS,
    WEIGHT_SOURCES,
)
from ..detector.config import DEFAULTS, OPTIONS, RUNTIME_OPTIONS, DetectorConfig
from ..scoring.registry import spatial_modes


def wrap(text: str, width: int = 100) -> str:
    """A command's description as wrapped lines (the raw formatter, kept for the epilogs, does not wrap)."""
    import textwrap

    return textwrap.fill(" ".join(text.split()), width)


class CLIError(Exception):
    """A user mistake found by the command line itself (exit code 2)."""


# ---- argparse type checkers: a bad value becomes "argument --x: ..." and exit code 2 ----------------------
def _number_type(
    convert: Callable[[str], Any], accept: Callable[[Any], bool], expectation: str, name: str
) -> Callable[[str], Any]:
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


def int_in(low: int, high: int, shown_high: str = "") -> Callable[[str], int]:
    """An integer in [low, high]: the range a model file may hold (crd_fast.choices), so nothing is fitted or
    written that ``load`` would refuse."""
    return _number_type(
        int, lambda v: low <= v <= high, f"an integer in [{low}, {shown_high or high}]", f"int_in_{low}_{high}"
    )


def machine_threads() -> int:
    """CPU threads this process may use (its affinity where the system tells it, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_count(text: str) -> int:
    """--threads: a positive integer no larger than the machine's CPU threads."""
    value = positive_int(text)
    most = max(machine_threads(), os.cpu_count() or 1)
    if value > most:
        raise argparse.ArgumentTypeError(f"expected at most {most} (the CPU threads of this machine), got {text!r}")
    return value


def device_name(text: str) -> str:
    """--device: cpu, cuda, cuda:N or auto (checked against the machine when the detector is built)."""
    from ..detector.config import DetectorConfig

    try:
        return DetectorConfig.check("device", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}") from None


positive_float = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number", "positive_float")
finite_float = _number_type(float, math.isfinite, "a finite number", "finite_float")
fraction = _number_type(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", "fraction")
probability = _number_type(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "probability")


def lam_rel_value(text: str) -> Any:
    """'auto' or a positive finite number (the detector's lam_rel)."""
    if text == LAM_AUTO:
        return LAM_AUTO
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number or {LAM_AUTO!r}, got {text!r}")
    return value


def backbone_name(text: str) -> str:
    """A backbone name (see crd_fast.choices.BACKBONES) or 'timm:<model name>'."""
    if text in BACKBONES or (text.startswith("timm:") and len(text) > len("timm:")):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown backbone {text!r}; choose from {', '.join(BACKBONES)}, "
        "or timm:<name> for a timm model (pip install 'crd-fast[timm]')"
    )


def layer_list(text: str) -> tuple[str, ...]:
    """'layer2,layer3' -> ('layer2', 'layer3')."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated layer names, e.g. layer2,layer3")
    # timm backbones name their layers by module ("stages.1", "blocks.2") or index ("2"); the backbone checks them.
    bad = [n for n in names if n not in LAYERS and "." not in n and not n.isdigit()]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown layer(s) {', '.join(bad)}; choose from {', '.join(LAYERS)} "
            "(timm backbones: feature module names such as stages.1, or indices)"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"layers must not repeat, got {text!r}")
    return names


def weights_spec(text: str) -> str:
    """'imagenet', 'random' or the path of an existing state-dict file."""
    if text in WEIGHT_SOURCES:
        return text
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither 'imagenet', 'random' nor an existing weights file (safetensors or .pth)"
        )
    return text


# ---- parsers ------------------------------------------------------------------------------------------
@contextmanager
def command(
    sub: Any, name: str, *, help: str, description: str, epilog: str, run: Callable[[argparse.Namespace], int]
) -> Iterator[argparse.ArgumentParser]:
    """Build one command's parser: ``with command(sub, "fit", ...) as p:`` then add its own options.

    Every command gets a one-line ``help``, a wrapped ``description``, an ``epilog`` of examples kept as
    written, and, after its own options, the common flags; ``run(args)`` is what it does.
    """
    parser = sub.add_parser(
        name,
        help=help,
        description=wrap(description),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    yield parser
    add_common_flags(parser)
    parser.set_defaults(func=run)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--debug, --no-progress and --threads (every command has them)."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in logs)")
    parser.add_argument(
        "--threads",
        type=thread_count,
        metavar="N",
        help="CPU threads for PyTorch (and faiss) (default: PyTorch's choice; 1 helps on a busy shared machine)",
    )


def apply_common_flags(args: argparse.Namespace) -> None:
    """Settings that take effect before the command runs."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


#: How the detector options (DetectorConfig's fields; help texts and defaults come from there) appear on the
#: command line. blur_sigma and target_dim keep their defaults there.
_FLAGS: dict[str, dict[str, Any]] = {
    "backbone": dict(type=backbone_name, metavar="NAME"),
    "weights": dict(type=weights_spec, metavar="W"),
    "layers": dict(type=layer_list, metavar="L1,L2"),
    "embedding": dict(choices=EMBEDDINGS),
    "lam_rel": dict(type=lam_rel_value, metavar="X|auto"),
    "center": dict(action=argparse.BooleanOptionalAction),
    "rank": dict(type=int_in(1, MAX_DIM), metavar="R"),
    "resize": dict(type=int_in(1, MAX_IMAGE_SIDE), metavar="PX"),
    "crop": dict(type=int_in(1, MAX_IMAGE_SIDE), metavar="PX"),
    "device": dict(type=device_name, metavar="DEV"),
    "batch_size": dict(type=int_in(1, MAX_BATCH_SIZE), metavar="N"),
    "seed": dict(type=int_in(0, MAX_SEED, "2**63 - 1"), metavar="S"),
    "precision": dict(choices=PRECISIONS),
    "spatial": dict(choices=spatial_modes()),
    "local_rank": dict(type=int_in(1, MAX_DIM), metavar="K"),
    "local_shrinkage": dict(type=probability, metavar="A"),
}


def _shown(name: str, value: Any) -> str:
    if name == "center":
        return "--center" if value else "--no-center"
    if name == "layers":
        return ",".join(value)
    if name == "backbone":
        return f"{value}; choose from {', '.join(BACKBONES)}, or timm:<name> for a timm model"
    return str(value)


def _add_flag(group: Any, name: str, default: Any, note: str = "") -> None:
    """``--name`` for detector option ``name``: its DetectorConfig help, and the default (or ``note``) shown."""
    shown = _shown(name, default) if default is not None else note
    text = DetectorConfig.help(name) + (f" (default: {shown})" if shown else "")
    group.add_argument("--" + name.replace("_", "-"), default=default, help=text.replace("%", "%%"), **_FLAGS[name])


def add_detector_options(parser: argparse.ArgumentParser, size_note: str = "", **defaults: Any) -> None:
    """The CRDDetector options (fit, eval, demo), defaults from DetectorConfig unless given here (the demo's
    are small); ``resize=None``/``crop=None``: the command fills them in (``size_note`` tells the user how)."""
    unknown = set(defaults) - set(_FLAGS)
    if unknown:
        raise TypeError(f"not detector options on the command line: {sorted(unknown)}")
    group = parser.add_argument_group("detector options")
    # Unset defaults are filled in later; the note says how (sizes: by the command; layers: by the backbone).
    notes = {"resize": size_note, "crop": size_note, "layers": DEFAULT_LAYERS_NOTE}
    for name in OPTIONS:
        if name in _FLAGS and name not in RUNTIME_OPTIONS:
            _add_flag(group, name, defaults.get(name, DEFAULTS[name]), notes.get(name, ""))
    add_runtime_options(group, defaults.get("batch_size", DEFAULTS["batch_size"]))


def add_runtime_options(group: Any, batch_size: Optional[int] = DEFAULTS["batch_size"]) -> None:
    """--device, --batch-size and --precision; ``batch_size=None`` (predict): no defaults, the model file's
    values apply."""
    defaults = {
        "batch_size": batch_size,
        "device": None if batch_size is None else DEFAULTS["device"],
        "precision": None if batch_size is None else DEFAULTS["precision"],
    }
    for name in RUNTIME_OPTIONS:
        _add_flag(group, name, defaults[name])


def detector_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """CRDDetector keyword arguments from parsed detector options."""
    return {name: getattr(args, name) for name in OPTIONS if name in _FLAGS and hasattr(args, name)}


def make_detector(args: argparse.Namespace, **override: Any) -> Any:
    """Build the CRDDetector the options describe (imports torch)."""
    config = DetectorConfig(**{**detector_kwargs(args), **override})
    from ..detector.detector import CRDDetector

    return CRDDetector.from_config(config)


def progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def printable(text: str) -> str:
    """``text`` with the bytes of undecodable file names (surrogate escapes) shown as ``\\xNN``: printing it
    cannot fail, whatever the terminal's encoding."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def echo(*parts: Any) -> None:
    """Results go to stdout (progress bars and warnings go to stderr)."""
    print(printable(" ".join(str(p) for p in parts)), flush=True)


def warn(message: str) -> None:
    import sys

    print(f"crd-fast: warning: {printable(message)}", file=sys.stderr, flush=True)


Runner = Callable[[argparse.Namespace], int]
