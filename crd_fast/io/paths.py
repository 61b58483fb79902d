"""Path basics of the output-safety layer (torch-free): the temporary-name prefix, the error type and how paths are
shown in messages (the user's own path, undecodable bytes as ``\\xNN``)."""

from __future__ import annotations

import errno
import os
from typing import Union

PathLike = Union[str, os.PathLike]

#: Prefix of every temporary file or folder crd_fast creates next to its outputs (never read as input).
TEMP_PREFIX = ".crd-"
#: File-name limit of common file systems, in bytes.
NAME_MAX = 255


class OutputError(ValueError):
    """An output cannot be written safely (overlaps an input, is a device, exists and is not empty, ...);
    exit code 2."""


def display_path(path: PathLike) -> str:
    """``path`` as text for messages: bytes that are not UTF-8 shown as ``\\xNN`` (printable anywhere)."""
    text = path if isinstance(path, bytes) else os.fspath(path)
    if isinstance(text, bytes):
        raw = text
    else:
        try:
            raw = text.encode("utf-8", "surrogateescape")  # the file name's own bytes
        except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
            raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def quoted(path: PathLike) -> str:
    """``'path'`` for messages (see :func:`display_path`)."""
    return "'" + display_path(path) + "'"


def write_error(exc: OSError, target: PathLike, action: str = "write") -> OSError:
    """``exc`` re-raised as the same OSError type, naming the user's ``target`` and the real cause."""
    cause = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOENT: "its folder does not exist",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large for the file system",
        errno.EISDIR: "it is a directory",
        errno.ENOTDIR: "a part of its path is not a folder",
        errno.ENAMETOOLONG: "file name too long",
        errno.ELOOP: "too many levels of symbolic links",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):  # the path itself is wrong: bad input (exit 2)
        return OutputError(f"cannot {action} {quoted(target)}: {cause}")
    made = type(exc)(f"cannot {action} {quoted(target)}: {cause}")  # the message names the path
    made.errno = exc.errno
    return made
