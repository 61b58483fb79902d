"""The output-safety rule (torch-free): nothing crd_fast writes may destroy what it reads, or anything else.

Every command and every public writer declares, before any work, the inputs it reads (image files and folders,
model, weights, config, calibration set) and the outputs it will write (files, their sidecars, folders), and
:func:`check_outputs` refuses the declaration when an output

- is, contains or lies inside an input, or resolves to one (symbolic links followed, hard links compared by
  inode): inputs are never overwritten, deleted or mixed with results;
- is a device node, a FIFO or a socket (crd_fast replaces its outputs by rename: ``-o /dev/null`` would replace the
  device with a regular file), a directory where a file is written, or a file where a folder is written;
- has a name the file system cannot hold, or lies in a folder that cannot be written (probed, never guessed);
- is named twice (two outputs that resolve to one file).

A symbolic link as an output is followed: the file it points to is replaced (atomically, beside itself), the link
stays. Every single-file write (:func:`crd_fast.io.atomic.atomic_write`) applies the per-file part of these checks
again, so even a writer that forgot its declaration cannot replace a device or a directory. Folders an output goes
to are first cleaned of the leftovers of killed runs (:func:`crd_fast.io.commit.tidy_folder`).

Errors name the user's own path (undecodable bytes shown as ``\\xNN``) and are ValueError / OSError subclasses the
command line maps to exit code 2 (bad input), except a full disk (exit 1, still naming the path).
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .commit import tidy_folder
from .paths import NAME_MAX, TEMP_PREFIX, OutputError, PathLike, display_path, quoted, write_error

__all__ = [
    "CHECKED",
    "NAME_MAX",
    "TEMP_PREFIX",
    "OutputError",
    "OutputPlan",
    "PathLike",
    "check_image_names",
    "check_outputs",
    "path_inputs",
    "display_path",
    "probe_folder",
    "quoted",
    "resolve_output_file",
    "resolve_output_folder",
    "write_error",
]


def _kind(mode: int) -> Optional[str]:
    """What a non-regular, non-directory file is, for messages (None for regular files and folders)."""
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "not a regular file"


def _stat(path: PathLike, shown: PathLike) -> Optional[os.stat_result]:
    """os.stat (links followed) or None if nothing is there; loops and the like become errors naming ``shown``."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise write_error(exc, shown) from None


def _check_name(path: PathLike, shown: PathLike) -> None:
    for part in Path(path).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise OutputError(f"cannot write {quoted(shown)}: a name in it is longer than {NAME_MAX} bytes")


def _existing_ancestor(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def probe_folder(folder: PathLike, shown: PathLike) -> None:
    """Create and remove a temporary file in ``folder``: the only writability check that is always right."""
    try:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".probe", dir=folder)
    except OSError as exc:
        raise write_error(exc, shown) from exc
    os.close(fd)
    os.unlink(name)


def resolve_output_file(path: PathLike, probe: bool = True) -> Path:
    """The real file a write to ``path`` replaces (symbolic links followed), after the per-file checks: a name the
    file system can hold, not a directory, not a device / FIFO / socket, a folder that is (or can be made) a
    folder and, with ``probe``, is writable. Errors name ``path`` as the user gave it."""
    shown = path
    if os.fspath(path) in ("", b""):
        raise OutputError("cannot write '': the output path is empty")
    if os.fspath(path) in (".", ".."):
        raise IsADirectoryError(f"cannot write {quoted(shown)}: it is a directory")
    _check_name(path, shown)
    real = Path(os.path.realpath(path))
    _check_name(real, shown)
    st = _stat(real, shown)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"cannot write {quoted(shown)}: it is a directory")
        kind = _kind(st.st_mode)
        if kind is not None:
            raise OutputError(
                f"cannot write {quoted(shown)}: it is {kind}, not a regular file (crd-fast replaces its outputs, "
                "which would replace the device itself); choose a regular file"
            )
        if not st.st_mode & 0o222:  # rename would replace it whatever its mode (and root may write anything)
            raise OutputError(
                f"cannot write {quoted(shown)}: the file is read-only (no write permission for anyone); make it "
                "writable (chmod u+w) to let crd-fast replace it"
            )
    folder = _existing_ancestor(real.parent)
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {quoted(shown)}: {quoted(folder)} is a file, not a folder")
    if probe:
        probe_folder(folder, shown)
    return real


def resolve_output_folder(path: PathLike, probe: bool = True) -> Path:
    """The real folder results go to (symbolic links followed): it must be a folder or not exist yet, and it (or
    the nearest existing folder above it) must be writable."""
    shown = path
    if os.fspath(path) in ("", b""):
        raise OutputError("cannot write '': the output folder is empty")
    _check_name(path, shown)
    real = Path(os.path.realpath(path))
    st = _stat(real, shown)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        kind = _kind(st.st_mode) or "a file"
        raise OutputError(f"output {quoted(shown)} exists and is {kind}, not a folder")
    folder = real if st is not None else _existing_ancestor(real.parent)
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {quoted(shown)}: {quoted(folder)} is a file, not a folder")
    if probe:
        probe_folder(folder, shown)  # an existing folder receives the results inside it, a new one beside it
    return real


@dataclass(frozen=True)
class _Input:
    shown: str
    real: Path
    is_dir: bool
    ident: Optional[tuple[int, int]]  # (device, inode), for hard links


def _inputs(inputs: Iterable[PathLike]) -> list[_Input]:
    out = []
    for item in inputs:
        if item is None:
            continue
        real = Path(os.path.realpath(item))
        try:
            st = os.stat(real)
        except OSError:
            out.append(_Input(display_path(item), real, False, None))  # the reader reports a missing input
            continue
        out.append(_Input(display_path(item), real, stat.S_ISDIR(st.st_mode), (st.st_dev, st.st_ino)))
    return out


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _ident(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class OutputPlan:
    """What :func:`check_outputs` accepted: each output as given and the real path it will be written to."""

    files: tuple[tuple[str, Path], ...]
    folders: tuple[tuple[str, Path], ...]

    def real(self, path: PathLike) -> Path:
        """The real path of the declared output ``path``."""
        key = display_path(path)
        for shown, real in self.files + self.folders:
            if shown == key:
                return real
        raise KeyError(f"{quoted(path)} was not declared as an output")


#: The outputs declared to :func:`check_outputs` in this process, one tuple per call, most recent last (as shown in
#: messages; bounded): tests read it to see that every writer declares its outputs.
CHECKED: list[tuple[str, ...]] = []


def check_outputs(
    files: Iterable[PathLike] = (),
    folders: Iterable[PathLike] = (),
    inputs: Iterable[PathLike] = (),
    updates: Iterable[PathLike] = (),
    probe: bool = True,
    tidy: bool = True,
) -> OutputPlan:
    """Refuse, before any work, outputs that would destroy inputs or anything else (see the module docstring).

    Args:
        files: files that will be written (with every sidecar: ``model.onnx.json`` beside ``model.onnx``).
        folders: folders whose contents will be written or replaced (``predict -o OUT``, a report folder).
        inputs: files and folders that are read.
        updates: inputs that are also outputs on purpose (the model of ``fit --update``): an output may be one of
            them, and nothing else.
        probe: check that the folders can be written by creating and removing a temporary file in them.
        tidy: first recover interrupted commits in the output folders and remove leftovers of killed runs.

    Returns the accepted plan (the real path of every output). Raises OutputError (or IsADirectoryError,
    NotADirectoryError, PermissionError naming the path).
    """
    file_list = [f for f in files if f is not None]
    folder_list = [f for f in folders if f is not None]
    CHECKED.append(tuple(display_path(p) for p in file_list + folder_list))
    del CHECKED[:-64]
    read = _inputs(inputs)
    allowed = {Path(os.path.realpath(u)) for u in updates if u is not None}
    seen: dict[Path, str] = {}
    plan_files, plan_folders = [], []

    def once(real: Path, shown: PathLike) -> None:
        if real in seen:
            raise OutputError(f"{quoted(shown)} and {quoted(seen[real])} are the same output (written twice)")
        seen[real] = display_path(shown)

    for path in file_list:
        real = resolve_output_file(path, probe=probe)
        once(real, path)
        ident = _ident(real)
        for item in read:
            same = real == item.real or (ident is not None and ident == item.ident)
            if same and real in allowed:
                continue
            if same:
                via = "" if os.path.abspath(path) == str(real) else f" (through a link: it resolves to {quoted(real)})"
                raise OutputError(
                    f"output {quoted(path)} is the input {quoted(item.shown)}{via}: writing it would destroy the "
                    "input; choose another output path"
                )
            if item.is_dir and _inside(real, item.real):
                raise OutputError(
                    f"output {quoted(path)} lies inside the input folder {quoted(item.shown)}: it would be written "
                    "among the inputs (and read as one later); choose a path outside the inputs"
                )
        plan_files.append((display_path(path), real))
    for path in folder_list:
        real = resolve_output_folder(path, probe=probe)
        once(real, path)
        for item in read:
            if real == item.real:
                where = "is"
            elif _inside(item.real, real):
                where = "contains"
            elif item.is_dir and _inside(real, item.real):
                where = "lies inside"
            else:
                continue
            noun = "folder" if item.is_dir else "file"
            raise OutputError(
                f"output folder {quoted(path)} {where} the input {noun} {quoted(item.shown)}: results would "
                "overwrite, delete or mix with the inputs; choose a folder outside the inputs"
            )
        plan_folders.append((display_path(path), real))
    if tidy:
        for folder in (
            {r.parent for _, r in plan_files} | {r for _, r in plan_folders} | {r.parent for _, r in plan_folders}
        ):
            tidy_folder(folder)
    return OutputPlan(tuple(plan_files), tuple(plan_folders))


def path_inputs(items: object) -> list[PathLike]:
    """The paths among a writer's ``items`` (a folder or file path, or a list / tuple holding paths): its inputs."""
    if isinstance(items, (str, os.PathLike)):
        return [items]
    if isinstance(items, (list, tuple)):
        return [i for i in items if isinstance(i, (str, os.PathLike))]
    return []


def check_image_names(paths: Sequence[PathLike], what: str = "image file") -> None:
    """Refuse, naming the file, paths whose names are not valid UTF-8: they could not be written to the UTF-8 score
    tables and reports (CSV, JSON, HTML) after the work was done."""
    for p in paths:
        text = os.fspath(p)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise OutputError(
                f"{what} {quoted(p)} has a name that is not valid UTF-8 (shown with \\xNN escapes); its scores "
                "could not be written to scores.csv / scores.json: rename it"
            ) from None
