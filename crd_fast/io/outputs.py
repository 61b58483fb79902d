"""Output paths (torch-free): readable inputs, writable outputs, and result folders put in place atomically.

- :func:`check_readable_file` / :func:`check_output_file`: called before a command starts its work, so a
  mistake costs nothing and is reported with the user's path and the real cause (not found, permission
  denied, is a directory, a device, read-only file system), not an internal temporary name after an hour of
  fitting. The full rule (outputs never overlap inputs) is :func:`crd_fast.io.safety.check_outputs`.
- :class:`ResultFolder`: ``predict -o OUT`` writes everything into a staging folder and puts the results into OUT
  only when the whole run succeeded, as one commit (:mod:`crd_fast.io.commit`): a new OUT appears by one rename of
  the complete staging folder; in an existing OUT the set of results is replaced through a journal. A failed or
  killed run leaves OUT as it was (or, killed after the commit point, as the new complete set once recovered). OUT
  must be empty or new unless ``overwrite`` is given (then only crd_fast's own results in it are replaced, as a
  set), checked again under a lock at the commit, so two runs never silently replace each other; OUT may neither
  be nor lie inside nor contain an input.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .atomic import current_umask
from .commit import STAGE_PREFIX, Held, commit_moves, hold, is_temporary_name, release
from .safety import (
    NAME_MAX,
    TEMP_PREFIX,
    OutputError,
    PathLike,
    check_outputs,
    quoted,
    resolve_output_file,
    write_error,
)

__all__ = [
    "NAME_MAX",
    "TEMP_PREFIX",
    "OutputError",
    "ResultFolder",
    "check_output_file",
    "check_readable_file",
    "short_file_name",
]


def check_readable_file(path: PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a readable regular file; else FileNotFoundError / PermissionError /
    IsADirectoryError naming ``path`` and the real cause."""
    p = Path(path)
    shown = quoted(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {shown} does not exist") from None
    except PermissionError:
        raise PermissionError(f"{what} {shown}: permission denied (cannot reach it)") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{what} {shown} does not exist (a part of its path is a file)") from None
    except OSError as exc:
        raise write_error(exc, path, "read") from None
    if p.is_dir():
        raise IsADirectoryError(f"{what} {shown} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):  # reading a FIFO would wait forever, a device would never end
        raise OutputError(f"{what} {shown} is not a regular file (a device, FIFO or socket)")
    try:
        with open(p, "rb"):
            pass
    except PermissionError:
        raise PermissionError(f"{what} {shown}: permission denied (cannot read it)") from None
    return p


def check_output_file(path: PathLike) -> Path:
    """Fail now, naming ``path``, if a file could not be written there: it is a directory, a device, FIFO or
    socket, its name is too long, a part of its folder is a file, or the folder is not writable."""
    resolve_output_file(path)
    return Path(path)


def short_file_name(name: str, index: int, limit: int = NAME_MAX) -> str:
    """``name`` if it fits in ``limit`` bytes, else a shortened unique form: index, a hash and the name's start."""
    if len(os.fsencode(name)) <= limit:
        return name
    stem, suffix = os.path.splitext(name)
    tag = f"{index:05d}_{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}_"
    room = limit - len(tag) - len(os.fsencode(suffix))
    head = os.fsencode(stem)[:room].decode("utf-8", "ignore")
    return f"{tag}{head}{suffix}"


def _occupied(folder: Path) -> list[str]:
    """The entries of ``folder`` other than crd_fast's temporary ones."""
    try:
        return sorted(n for n in os.listdir(folder) if not is_temporary_name(n))
    except FileNotFoundError:
        return []


class ResultFolder:
    """A staged results folder. ``stage`` is where the run writes; :meth:`commit` puts its entries into the final
    folder as one commit; :meth:`discard` (or leaving the ``with`` block by an exception) removes the stage.

    Args:
        final: the output folder the user named (a symbolic link to a folder is followed).
        entries: the names this command writes there (e.g. scores.csv, scores.json, heatmaps): the result set. At
            the commit every one of them is replaced by the staged one, or removed if the run did not make it, so
            an earlier run's results never mix with this one's.
        inputs: the input files and folders; the output may not overlap any of them.
        overwrite: allow a non-empty ``final``; the named ``entries`` in it are replaced, nothing else is touched.
        open: create the staging folder now; ``open=False``: call :meth:`open` later (a distributed run creates
            it on rank 0 and the other ranks attach to it by path).
    """

    def __init__(
        self,
        final: PathLike,
        entries: Sequence[str],
        inputs: Iterable[PathLike] = (),
        overwrite: bool = False,
        open: bool = True,
    ) -> None:
        self.final = Path(final)
        self.entries = tuple(entries)
        self.overwrite = overwrite
        plan = check_outputs(folders=[final], inputs=inputs)
        self.real = plan.real(final)
        if self.real.is_dir() and _occupied(self.real) and not overwrite:
            raise OutputError(
                f"output folder {quoted(final)} is not empty; choose a new or empty folder, or pass "
                "--overwrite to replace the results in it (scores and heatmaps, all at once at the end)"
            )
        self._stage: Optional[Path] = None
        self._lock: Optional[Held] = None
        if open:
            self.open()

    @property
    def stage(self) -> Path:
        if self._stage is None:
            raise RuntimeError("the result folder's staging folder is not open yet (call open())")
        return self._stage

    def open(self, attach: Optional[PathLike] = None) -> "ResultFolder":
        """Create the staging folder (inside OUT if it exists, else beside it) or, with ``attach``, join the one
        another process of the same run created. It is held (locked shared) against clean-up until the end."""
        if attach is not None:
            self._stage = Path(attach)
        else:
            existing = self.real.is_dir()
            parent = self.real if existing else self.real.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
                self._stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=parent))
                if not existing:
                    os.chmod(self._stage, 0o777 & ~current_umask())
            except OSError as exc:
                raise write_error(exc, self.final, "create the output folder") from exc
        self._lock = hold(self._stage)
        return self

    def __enter__(self) -> "ResultFolder":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.discard()

    def discard(self) -> None:
        release(self._lock)
        self._lock = None
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)

    def _check_still_free(self) -> None:
        """The new-or-empty check again, at the commit (under the folder's lock)."""
        if not self.overwrite and _occupied(self.real):
            raise OutputError(
                f"output folder {quoted(self.final)} was filled by another run while this one worked "
                f"({', '.join(_occupied(self.real)[:3])}); nothing was replaced: choose a new folder or --overwrite"
            )

    def commit(self) -> Path:
        """Put the staged results into the final folder (replacing earlier results of the same names) as one
        commit; the new-or-empty check is repeated at this point."""
        stage = self.stage
        if stage.parent != self.real:  # OUT did not exist: it appears by one rename, complete
            try:
                os.rename(stage, self.real)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.real.is_dir():
                    raise write_error(exc, self.final, "create the output folder") from exc
                self._check_still_free()  # another run made OUT meanwhile: refused, or joined with --overwrite
                inner = self.real / stage.name
                os.rename(stage, inner)
                release(self._lock)
                self._stage, self._lock = inner, hold(inner)
                return self.commit()
            release(self._lock)
            self._lock, self._stage = None, None
            return self.final
        moves = [(stage / name if os.path.lexists(stage / name) else None, self.real / name) for name in self.entries]
        try:
            commit_moves(self.real, moves, cleanup=[stage], check=self._check_still_free)
        except OSError as exc:
            raise write_error(exc, self.final, "write results into") from exc
        release(self._lock)
        self._lock, self._stage = None, None
        return self.final
