"""Atomic file writes (torch-free): write beside the target, fsync, rename into place.

The temporary file has a short name of its own (``.crd-XXXXXXXX.tmp``), so a target whose name is near the
file-system limit can still be written, and it is given the permissions the umask allows (0644 under 022),
as ``open()`` would, not ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]

#: Prefix of every temporary file or folder crd_fast creates next to its outputs.
TEMP_PREFIX = ".crd-"


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


def write_error(exc: OSError, target: PathLike, action: str = "write") -> OSError:
    """``exc`` re-raised as the same OSError type, naming the user's ``target`` and the real cause."""
    cause = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOENT: "its folder does not exist",
        errno.ENOSPC: "no space left on device",
        errno.EISDIR: "it is a directory",
        errno.ENOTDIR: "a part of its path is not a folder",
        errno.ENAMETOOLONG: "file name too long",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return type(exc)(f"cannot {action} {os.fspath(target)!r}: {cause}")  # the message names the path


@contextlib.contextmanager
def atomic_write(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. An existing directory at
    ``path`` or an unwritable folder is refused before the caller writes anything, with an error naming ``path``.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {os.fspath(path)!r}: it is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise write_error(exc, path) from exc
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), default_file_mode())  # after writing: some writers (safetensors) recreate 0600
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise write_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
