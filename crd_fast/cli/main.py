"""Entry point of the ``crd-fast`` command line: the parser, dispatch to one module per command, errors.

Each command lives in its own module with ``register(subparsers)`` (adds its parser and sets
``func``); to add a command, write such a module and list it in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import textwrap
from typing import Iterator, NoReturn, Optional, Sequence

from . import bench, demo, evaluate, export, fit, predict
from .config import expand_config
from .options import CLIError, apply_common_flags, printable

#: The command modules, in the order ``--help`` lists them.
COMMANDS = (fit, predict, evaluate, demo, export, bench)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    runtime failure (anything not caused by the input: out of memory, a failed distributed peer, a bug)
  2    usage error or bad input: unknown option or bad value, missing file or folder, unreadable image,
       corrupt or mismatched model file, backbone weights not available (e.g. 'imagenet' offline)
  130  interrupted (Ctrl-C)
Errors are one line 'crd-fast: error: ...'; add --debug to see the traceback."""

MAIN_EPILOG = (
    """\
quick start (no data, weights or network needed):
  crd-fast demo                          generate a small data set, fit, evaluate, write an HTML report

typical use:
  crd-fast fit good_images/ -o model.crd
  crd-fast predict model.crd new_images/ -o results/
  crd-fast eval mvtec_ad/ --category bottle --report report/
  crd-fast export model.crd -o model.onnx

'crd-fast COMMAND --help' explains each command.

"""
    + EXIT_CODES_HELP
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``crd-fast: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"crd-fast: error: {message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="crd-fast",
        description=textwrap.dedent("""\
            Find defects in images with a model trained on defect-free images only.
            crd-fast scores each image patch by its Collaborative Representation Distance (CRD) to the
            training patches: one d x d matrix replaces the memory bank of nearest-neighbour methods."""),
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"crd-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--config", metavar="FILE", help="read options from a TOML (or YAML) file; options typed here override it"
        )
        command.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            default=None,
            help="show the library's log messages at this level and above on stderr "
            "(default: warning; debug with --debug)",
        )
    return parser


class _NotGiven:
    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN = _NotGiven()


def given_options(argv: Sequence[str]) -> frozenset[str]:
    """The option names (dests) ``argv`` sets explicitly, whatever their values: parsed again with every default
    replaced by a marker (argparse's own matching, abbreviations included)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # no public accessor
    collecting = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction, argparse._ExtendAction)
    for command in sub.choices.values():  # options that add to their default get None, the others the marker
        command.set_defaults(
            **{a.dest: None if isinstance(a, collecting) else _NOT_GIVEN for a in command._actions if a.option_strings}
        )
    try:
        parsed = parser.parse_args(list(argv))
    except SystemExit:  # cannot happen after a successful parse of the same argv; be safe
        return frozenset()
    return frozenset(k for k, v in vars(parsed).items() if v is not _NOT_GIVEN and v is not None)


#: --log-level choices (names of the logging module's levels).
LOG_LEVELS = ("debug", "info", "warning", "error")


@contextlib.contextmanager
def library_logging(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs, send the library's log records (logger ``crd_fast``) to stderr at the chosen level.

    The library only logs; the command line decides where the records go, and undoes it afterwards (main()
    may be called many times in one process). Its own messages (results, summaries, errors) are unchanged.
    """
    level = args.log_level or ("debug" if getattr(args, "debug", False) else "warning")
    logger = logging.getLogger("crd_fast")
    before = logger.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("crd-fast: %(levelname)s: %(name)s: %(message)s"))
    logger.setLevel(level.upper())
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def _classify(exc: BaseException) -> int:
    """Exit code for an exception: 2 for bad input / usage, 1 for everything else."""
    user_errors: tuple[type, ...] = (
        CLIError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        FileExistsError,
        ValueError,
    )
    try:  # imported lazily: they pull in torch, which --help does not need
        from ..features.backbone import BackboneWeightsError
        from ..features.preprocess import ImageReadError
        from ..io.model_file import ModelFileError

        user_errors += (BackboneWeightsError, ImageReadError, ModelFileError)
    except ImportError:
        pass
    try:
        from ..distributed.reduce import DistributedError

        if isinstance(exc, DistributedError):
            return EXIT_FAILURE
    except ImportError:
        pass
    return EXIT_USAGE if isinstance(exc, user_errors) else EXIT_FAILURE


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line, whatever the exception's formatting
    if (
        isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
        and exc.filename
        and str(exc.filename) not in text
    ):
        text = f"{text}: {exc.filename}"
    if type(exc).__name__ == "BackboneWeightsError" and "weights=" in text:
        text += " -- on the command line: --weights PATH (or --weights random)"
    if isinstance(exc, ModuleNotFoundError):
        text = (
            f"{text} (an optional dependency is missing: pip install 'crd-fast[onnx]' for export, "
            "'crd-fast[faiss]' for faiss)"
        )
    return text or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    typed = list(sys.argv[1:] if argv is None else argv)
    try:
        expanded, config_path = expand_config(typed, parser)
    except CLIError as exc:
        print(f"crd-fast: error: {printable(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        args = parser.parse_args(expanded)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    args.config = config_path
    args.argv = typed  # for reports ("command" line)
    args.given = given_options(expanded)  # options typed or read from the config file, not defaults
    try:
        with library_logging(args):
            apply_common_flags(args)
            return int(args.func(args))
    except KeyboardInterrupt:
        print("crd-fast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        code = _classify(exc)
        hint = (
            ""
            if getattr(args, "debug", False)
            else ("" if code == EXIT_USAGE else " (run with --debug for the traceback)")
        )
        print(f"crd-fast: error: {printable(_message(exc))}{hint}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
