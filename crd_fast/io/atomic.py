"""Atomic file writes (torch-free): write beside the target, fsync, rename into place.

The temporary file has a short name of its own (``.crd-XXXXXXXX.tmp``), so a target whose name is near the
file-system limit can still be written, and it is given the permissions the umask allows (0644 under 022),
as ``open()`` would, not ``mkstemp``'s private 0600. Every target first passes the per-file output checks of
:mod:`crd_fast.io.safety` (no device, FIFO, socket or directory is replaced; a symbolic link is followed and the
file it points to is replaced, the link kept). :func:`atomic_write_many` writes several files as one commit
(:mod:`crd_fast.io.commit`): a kill at any point leaves all the old files or all the new ones.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Sequence

from .commit import StagedFile, commit_moves
from .safety import TEMP_PREFIX, OutputError, PathLike, resolve_output_file, write_error

__all__ = [
    "TEMP_PREFIX",
    "OutputError",
    "PathLike",
    "atomic_write",
    "atomic_write_many",
    "current_umask",
    "default_file_mode",
    "write_error",
]

#: errno values of a failed write that are the environment's, not the writer's: re-raised naming the target.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def _named(exc: BaseException, target: PathLike) -> BaseException:
    """A failure of the writer itself, re-raised naming ``target`` when it is the environment's (disk full,
    read-only, ...); other exceptions unchanged. Writers in other languages (safetensors) report a full disk as
    text only."""
    if isinstance(exc, OSError) and type(exc) in (OSError, PermissionError) and exc.errno in _WRITE_ERRNOS:
        return write_error(exc, target)
    if not isinstance(exc, OSError) and "No space left on device" in str(exc):
        return write_error(OSError(errno.ENOSPC, "No space left on device"), target)
    return exc


@contextlib.contextmanager
def atomic_write_many(paths: Sequence[PathLike], suffix: str = ".tmp") -> Iterator[list[Path]]:
    """Yield one temporary path beside each of ``paths``; when the block ends, all are fsynced and put in place as
    one commit (a journal in the first target's folder when there are several).

    On any exception every temporary file is removed and every target is left as it was. Every target is checked
    before the caller writes anything (:func:`crd_fast.io.safety.resolve_output_file`), errors naming it.
    """
    targets = [resolve_output_file(p, probe=False) for p in paths]  # creating the temporary file probes
    if len(set(targets)) != len(targets):
        raise OutputError(f"the same file is written twice: {[os.fspath(p) for p in paths]}")
    staged: list[StagedFile] = []
    try:
        for target, shown in zip(targets, paths):
            staged.append(StagedFile(target, shown, suffix))
        try:
            yield [s.path for s in staged]
        except BaseException as exc:
            culprit = getattr(exc, "filename", None)
            shown = next((s.shown for s in staged if culprit is not None and os.fspath(s.path) == culprit), paths[0])
            named = _named(exc, shown)
            if named is exc:
                raise
            raise named from exc
        mode = default_file_mode()
        for s in staged:
            s.finish(mode)
        try:
            if len(staged) == 1:
                os.replace(staged[0].path, staged[0].target)
            else:
                commit_moves(targets[0].parent, [(s.path, s.target) for s in staged])
        except OSError as exc:
            raise write_error(exc, paths[0]) from exc
        for s in staged:
            s.release()
    except BaseException:
        for s in staged:
            s.discard()
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. An existing directory, device,
    FIFO or socket at ``path``, a name too long or an unwritable folder is refused before the caller writes
    anything, with an error naming ``path``; a symbolic link is followed (its target is replaced).
    """
    with atomic_write_many([path], suffix) as tmps:
        yield tmps[0]
