"""One writer per model file: an advisory lock plus a compare-and-swap on the file's checksum.

``fit --update`` reads a model, adds images and writes it back; two such runs at once would each write
their own sum and one update would be lost. :func:`model_update` holds an exclusive, non-blocking
``fcntl.flock`` on the model file from before it is read until the new file has been renamed into place,
and remembers the SHA-256 of the bytes it read. Every writer of a model file (``write_model_file``) goes
through :func:`exclusive_write`, which

- fails at once with :class:`ConcurrentUpdateError` if another process holds the lock, and
- inside an update, refuses to replace the file if its bytes changed since they were read (a writer that
  does not lock, e.g. on a file system without flock, or a copy put in place by hand).

The lock is taken on the model file itself (no lock files left behind). Because writes replace the file by
rename, a lock on the old inode is checked against the path after it is acquired and retaken if stale.
Where fcntl is missing (Windows) only the checksum comparison applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

from .atomic import PathLike

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]


class ConcurrentUpdateError(ValueError):
    """Another process is writing the same model file, or changed it since it was read (exit code 2)."""


_held: dict[str, Optional[str]] = {}  # real path -> SHA-256 read at the start of the update (None: new file)
_held_lock = threading.Lock()


def file_sha256(path: PathLike) -> Optional[str]:
    """SHA-256 of the file's bytes, or None if it does not exist."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _key(path: PathLike) -> str:
    return os.path.realpath(os.fspath(path))


@contextlib.contextmanager
def _flock(path: PathLike) -> Iterator[None]:
    """Exclusive non-blocking lock on the file now at ``path`` (nothing to lock if it does not exist)."""
    if fcntl is None:
        yield
        return
    for _ in range(8):
        try:
            fd = os.open(os.fspath(path), os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConcurrentUpdateError(
                f"{os.fspath(path)}: another process is writing this model file (e.g. another 'fit --update'); "
                "try again when it has finished"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(os.fspath(path)).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                yield
            finally:
                os.close(fd)  # closing releases the lock
            return
        os.close(fd)  # the file was replaced while we waited for it: lock the new one
    raise ConcurrentUpdateError(f"{os.fspath(path)}: the model file keeps being replaced by another process")


@contextlib.contextmanager
def model_update(path: PathLike) -> Iterator[None]:
    """Hold ``path`` for a read-modify-write: locked, with its checksum remembered for :func:`exclusive_write`.

    Read the model inside this block and write it (``save``) inside it too; a concurrent updater fails with
    :class:`ConcurrentUpdateError` instead of losing one of the two updates.
    """
    key = _key(path)
    with _flock(path):
        with _held_lock:
            if key in _held:
                raise ConcurrentUpdateError(f"{os.fspath(path)}: already being updated in this process")
            _held[key] = file_sha256(path)
        try:
            yield
        finally:
            with _held_lock:
                _held.pop(key, None)


@contextlib.contextmanager
def exclusive_write(path: PathLike) -> Iterator[None]:
    """Wrap the replacement of a model file: inside :func:`model_update` check the file is unchanged since it
    was read; outside, take the lock for the duration of the write."""
    key = _key(path)
    with _held_lock:
        inside = key in _held
        expected = _held.get(key)
    if inside:
        if file_sha256(path) != expected:
            raise ConcurrentUpdateError(
                f"{os.fspath(path)}: the model file was changed by someone else since this update read it; "
                "not overwriting it (run the update again)"
            )
        yield
        return
    if not Path(path).exists():
        yield
        return
    with _flock(path):
        yield
