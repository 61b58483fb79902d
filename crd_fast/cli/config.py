"""``--config FILE``: command-line options from a TOML (or YAML) file.

    # crd-fast.toml                      crd-fast fit good/ -o model.crd --config crd-fast.toml
    backbone = "resnet18"                # top-level keys: options of any command
    threads = 2
    [fit]                                # a table per command: its own options (override the top level)
    calibrate = true
    layers = ["layer2", "layer3"]

Keys are option names (``batch-size`` or ``batch_size``). The file's options are placed before the ones
typed on the command line, so a typed option wins. Flags take true/false; lists fill multi-value options
(or are joined by commas). Positional arguments (data folders, model files) are not read from the file.
TOML is read with the standard library (Python 3.11+; ``tomli`` on older Pythons); YAML needs PyYAML,
which crd-fast does not install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .options import CLIError

SUFFIXES = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}


def load_config(path: str) -> dict[str, Any]:
    """The mapping in a .toml / .yaml / .yml file (a CLIError names what is wrong with it)."""
    p = Path(path)
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise CLIError(f"config file {path}: unknown format (use a .toml, .yaml or .yml file)")
    if p.exists() and not p.is_file():
        raise CLIError(f"config file {path}: not a regular file (a folder, device or FIFO)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(
            f"config file {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise CLIError(f"config file {path}: cannot read it ({exc.strerror or exc})") from exc
    if kind == "toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.9/3.10
            try:
                import tomli as tomllib
            except ImportError as exc:
                raise CLIError("reading a TOML config file on Python < 3.11 needs tomli (pip install tomli)") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CLIError(f"config file {path}: not valid TOML ({exc})") from exc
    else:
        try:
            import yaml
        except ImportError as exc:
            raise CLIError(f"config file {path}: YAML needs PyYAML (pip install pyyaml), or use a .toml file") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CLIError(f"config file {path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CLIError(
            f"config file {path}: must hold a mapping of option names to values, not a {type(data).__name__}"
        )
    return data


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}  # argparse has no public action list


def config_tokens(path: str, command: str, parser: argparse.ArgumentParser, commands: Sequence[str]) -> list[str]:
    """Command-line tokens for ``command`` from the config file at ``path``."""
    data = load_config(path)
    options = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for key, value in data.items():
        if isinstance(value, dict) and key not in commands:
            raise CLIError(f"config file {path}: table [{key}] is not a command (commands: {', '.join(commands)})")
    section = data.get(command)
    if isinstance(section, dict):
        options.update(section)
    actions = _actions(parser)
    positionals = {a.dest for a in parser._actions if not a.option_strings}
    tokens: list[str] = []
    for key, value in options.items():
        dest = str(key).replace("-", "_")
        if dest in positionals:
            raise CLIError(
                f"config file {path}: {key!r} is a positional argument of '{command}'; give it on the command line"
            )
        if dest in ("config", "help", "version"):
            raise CLIError(f"config file {path}: {key!r} cannot be set in a config file")
        action = actions.get(dest)
        if action is None:
            raise CLIError(f"config file {path}: '{command}' has no option {key!r}")
        tokens += _tokens(path, key, value, action)
    return tokens


def _tokens(path: str, key: str, value: Any, action: argparse.Action) -> list[str]:
    flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise CLIError(f"config file {path}: {key!r} is a flag; give true or false, not {value!r}")
        return [action.option_strings[0] if value else action.option_strings[1]]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CLIError(f"config file {path}: {key!r} is a flag; give true or false, not {value!r}")
        return [flag] if value == action.const else []
    if isinstance(value, bool) or value is None:
        raise CLIError(f"config file {path}: {key!r} needs a value, not {value!r}")
    if isinstance(value, list):
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return [flag, *map(str, value)]
        return [flag, ",".join(map(str, value))]
    return [flag, str(value)]


def expand_config(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], Optional[str]]:
    """``argv`` with ``--config FILE`` replaced by the file's options, placed right after the command name
    so that options typed on the command line override them; returns (argv, the config path or None)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return argv, None
    path: Optional[str] = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest += argv[i:]
            break
        if tok == "--config":
            if i + 1 >= len(argv):
                raise CLIError("--config needs a FILE")
            path, i = argv[i + 1], i + 2
            continue
        if tok.startswith("--config="):
            path, i = tok.split("=", 1)[1], i + 1
            continue
        rest.append(tok)
        i += 1
    if path is None:
        return argv, None
    where = next((k for k, t in enumerate(rest) if t in sub.choices), None)
    if where is None:
        raise CLIError("--config needs a command (e.g. 'crd-fast fit --config FILE ...')")
    command = rest[where]
    tokens = config_tokens(path, command, sub.choices[command], list(sub.choices))
    return rest[: where + 1] + tokens + rest[where + 1 :], path
