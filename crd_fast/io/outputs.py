"""Output safety (torch-free): check output paths before any work, and put result folders in place atomically.

- :func:`check_readable_file` / :func:`check_output_file`: called before a command starts its work, so a
  mistake costs nothing and is reported with the user's path and the real cause (not found, permission
  denied, is a directory, read-only file system), not an internal temporary name after an hour of fitting.
- :class:`ResultFolder`: ``predict -o OUT`` writes everything into a staging folder beside OUT and moves the
  results into OUT only when the whole run succeeded, so a failed run leaves OUT exactly as it was. OUT must
  be empty or new unless ``overwrite`` is given (then only crd_fast's own results in it are replaced, as a
  set); OUT may neither be nor lie inside nor contain an input, so inputs are never overwritten and a later
  ``-r`` run over the inputs never scores earlier heatmaps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .atomic import TEMP_PREFIX, PathLike, current_umask, write_error

#: File-name limit of common file systems, in bytes.
NAME_MAX = 255


class OutputError(ValueError):
    """An output path cannot be used (exists and is not empty, overlaps an input, ...); exit code 2."""


def check_readable_file(path: PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a readable regular file; else FileNotFoundError / PermissionError /
    IsADirectoryError naming ``path`` and the real cause."""
    p = Path(path)
    shown = os.fspath(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {shown!r} does not exist") from None
    except PermissionError:
        raise PermissionError(f"{what} {shown!r}: permission denied (cannot reach it)") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{what} {shown!r} does not exist (a part of its path is a file)") from None
    if p.is_dir():
        raise IsADirectoryError(f"{what} {shown!r} is a directory, not a file")
    del st
    try:
        with open(p, "rb"):
            pass
    except PermissionError:
        raise PermissionError(f"{what} {shown!r}: permission denied (cannot read it)") from None
    return p


def _probe_folder(folder: Path, target: PathLike) -> None:
    """Create and remove a temporary file in ``folder``: the only check of writability that is always right."""
    try:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".probe", dir=folder)
    except OSError as exc:
        raise write_error(exc, target) from exc
    os.close(fd)
    os.unlink(name)


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: PathLike) -> Path:
    """Fail now, naming ``path``, if a file could not be written there: it is a directory, its name is too
    long, a part of its folder is a file, or the folder is not writable."""
    p = Path(path)
    shown = os.fspath(path)
    if p.is_dir():
        raise IsADirectoryError(f"cannot write {shown!r}: it is a directory")
    if len(os.fsencode(p.name)) > NAME_MAX:
        raise OSError(f"cannot write {shown!r}: file name longer than {NAME_MAX} bytes")
    folder = _existing_ancestor(p.parent.absolute())
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {shown!r}: {str(folder)!r} is a file, not a folder")
    _probe_folder(folder, path)
    return p


def short_file_name(name: str, index: int, limit: int = NAME_MAX) -> str:
    """``name`` if it fits in ``limit`` bytes, else a shortened unique form: index, a hash and the name's start."""
    if len(os.fsencode(name)) <= limit:
        return name
    stem, suffix = os.path.splitext(name)
    tag = f"{index:05d}_{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}_"
    room = limit - len(tag) - len(os.fsencode(suffix))
    head = os.fsencode(stem)[:room].decode("utf-8", "ignore")
    return f"{tag}{head}{suffix}"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


class ResultFolder:
    """A staged results folder. ``stage`` is where the run writes; :meth:`commit` moves its entries into the
    final folder; :meth:`discard` (or leaving the ``with`` block by an exception) removes the stage.

    Args:
        final: the output folder the user named.
        entries: the names this command writes there (e.g. scores.csv, scores.json, heatmaps).
        inputs: the input files and folders; the output may not overlap any of them.
        overwrite: allow a non-empty ``final``; the named ``entries`` in it are replaced, nothing else is touched.
        stage_name: a fixed staging folder name (all processes of a distributed run must agree on it);
            default: a fresh random one.
    """

    def __init__(
        self,
        final: PathLike,
        entries: Sequence[str],
        inputs: Iterable[PathLike] = (),
        overwrite: bool = False,
        stage_name: Optional[str] = None,
    ) -> None:
        self.final = Path(final)
        self.entries = tuple(entries)
        shown = os.fspath(final)
        out = self.final.resolve()
        for item in inputs:
            src = Path(item).resolve()
            if _inside(out, src) or _inside(src, out):
                where = "is inside" if _inside(src, out) and src != out else "contains" if src != out else "is"
                raise OutputError(
                    f"output folder {shown!r} {where} the input {os.fspath(item)!r}: results would "
                    "overwrite or mix with the inputs; choose a folder outside the inputs"
                )
        if self.final.exists() and not self.final.is_dir():
            raise OutputError(f"output {shown!r} exists and is not a folder")
        if self.final.is_dir() and any(self.final.iterdir()) and not overwrite:
            raise OutputError(
                f"output folder {shown!r} is not empty; choose a new or empty folder, or pass "
                "--overwrite to replace the results in it (scores and heatmaps, all at once at the end)"
            )
        parent = _existing_ancestor(self.final.parent.absolute())
        if not parent.is_dir():
            raise NotADirectoryError(f"cannot write {shown!r}: {str(parent)!r} is a file")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if stage_name is None:
                self.stage = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + "stage-", dir=self.final.parent))
            else:
                self.stage = self.final.parent / stage_name
                self.stage.mkdir(exist_ok=True)
            os.chmod(self.stage, 0o777 & ~_umask())
        except OSError as exc:
            raise write_error(exc, final, "create the output folder") from exc

    def __enter__(self) -> "ResultFolder":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def commit(self) -> Path:
        """Move the staged results into the final folder (replacing earlier results of the same names)."""
        if not self.final.exists():
            os.rename(self.stage, self.final)  # the whole folder appears at once
            return self.final
        old = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + "old-", dir=self.final))
        try:
            for name in self.entries:  # set the previous results aside first: no mix of old and new
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.final / name, old / name)
            for name in self.entries:
                if (self.stage / name).exists():
                    shutil.move(os.fspath(self.stage / name), os.fspath(self.final / name))
        finally:
            shutil.rmtree(old, ignore_errors=True)
            self.discard()
        return self.final


def _umask() -> int:
    return current_umask()
