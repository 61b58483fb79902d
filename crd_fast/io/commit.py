"""Commit protocols (torch-free): outputs replaced so that a kill -9 at any instruction leaves either the old
complete set or the new complete set (docs/DESIGN.md "Guarantees", "Atomicity").

- **One file**: written beside itself under a temporary name and renamed onto the target (one rename).
- **A new result folder**: built complete under a staging name beside it and renamed into place (one rename; the
  kernel itself refuses it once another run has filled the folder, so two runs never replace each other).
- **Several files, or the entries of an existing folder**: a journal. The new versions are staged beside their
  targets; then, under an exclusive lock on the folder, a journal listing every move is written under a temporary
  name and renamed into place (the commit point), the moves are made and the journal is removed. A run killed
  before the journal exists leaves the old set; one killed after it is rolled forward by the next crd_fast that
  touches the folder (:func:`recover_folder`: every writer through :func:`tidy_folder`, and the readers of exports),
  each move being idempotent.
- **Leftovers** of killed runs (``.crd-stage-*``, ``.crd-old-*``, ``.crd-*.tmp``, ...) are removed by
  :func:`tidy_folder` once they are older than the current run and no live process holds their lock (staging
  folders and temporary files are held with a shared ``flock`` while in use); the image listings never read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .paths import TEMP_PREFIX, PathLike, write_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

#: When this process started using crd_fast: leftovers older than this and unlocked belong to finished runs.
RUN_START = time.time()

STAGE_PREFIX = TEMP_PREFIX + "stage-"
ASIDE_PREFIX = TEMP_PREFIX + "old-"
JOURNAL_PREFIX = TEMP_PREFIX + "journal-"
JOURNAL_FORMAT = "crd-fast-journal"
#: Name patterns of crd_fast's own temporary entries (prefix, suffix); journals are recovered, never swept.
_LEFTOVERS = ((STAGE_PREFIX, ""), (ASIDE_PREFIX, ""), (TEMP_PREFIX + "ov-", ""), (TEMP_PREFIX, ".tmp"),
              (TEMP_PREFIX, ".probe"))  # fmt: skip


def is_temporary_name(name: str) -> bool:
    """True for the names of crd_fast's temporary files and folders (never inputs, never results)."""
    return name.startswith(TEMP_PREFIX)


# ---- locks ------------------------------------------------------------------------------------------------
#: Real paths this process holds (:func:`hold`), with how many times: its own staging folders. A commit into one of
#: them needs no folder lock (nobody else commits there, and the hold keeps clean-up away), and taking one would wait
#: forever on the process's own shared lock.
_HELD: dict[str, int] = {}


@contextlib.contextmanager
def folder_lock(folder: PathLike) -> Iterator[None]:
    """An exclusive, blocking ``flock`` on ``folder`` for a commit or a recovery (nothing where flock is missing,
    the folder cannot be opened for reading, or this process holds the folder as its own staging folder)."""
    if fcntl is None or os.path.realpath(folder) in _HELD:
        yield
        return
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Held:
    """A shared ``flock`` on a staging folder or temporary file in use (see :func:`hold`)."""

    def __init__(self, fd: int, key: str) -> None:
        self.fd, self.key = fd, key


def hold(path: PathLike) -> Optional[Held]:
    """A shared ``flock`` on ``path`` (a staging folder or temporary file in use): :func:`tidy_folder` leaves it
    alone until :func:`release`. None where it cannot be taken."""
    if fcntl is None:
        return None
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    key = os.path.realpath(path)
    _HELD[key] = _HELD.get(key, 0) + 1
    return Held(fd, key)


def release(held: Optional[Held]) -> None:
    """End a :func:`hold` (None: nothing to do)."""
    if held is None:
        return
    with contextlib.suppress(OSError):
        os.close(held.fd)
    count = _HELD.get(held.key, 0) - 1
    if count > 0:
        _HELD[held.key] = count
    else:
        _HELD.pop(held.key, None)


def _abandoned(path: Path) -> bool:
    """True if no live process holds ``path`` (an exclusive lock can be taken at once)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ---- journals ---------------------------------------------------------------------------------------------
def _remove(path: PathLike) -> None:
    p = os.fspath(path)
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(p)


def _set_aside(dst: str, aside: str) -> None:
    os.makedirs(aside, exist_ok=True)
    name = os.path.basename(dst)
    target = os.path.join(aside, name)
    n = 0
    while os.path.lexists(target):
        n += 1
        target = os.path.join(aside, f"{name}.{n}")
    os.rename(dst, target)


def _apply(src: Optional[str], dst: str, aside: str) -> None:
    """One move of a journal, idempotent: ``src`` replaces ``dst`` (None: ``dst`` is removed). A folder, or
    anything a folder replaces, is first set aside (rename cannot replace a non-empty folder)."""
    if src is None:
        if os.path.lexists(dst):
            _set_aside(dst, aside)
        return
    if not os.path.lexists(src):
        return  # made before the interruption
    dst_is_dir = os.path.isdir(dst) and not os.path.islink(dst)
    if os.path.lexists(dst) and (dst_is_dir or os.path.isdir(src)):
        _set_aside(dst, aside)
    os.replace(src, dst)


def _fsync_folder(folder: PathLike) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.fspath(folder), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_journal(folder: Path, doc: dict) -> Path:
    journal = folder / f"{JOURNAL_PREFIX}{uuid.uuid4().hex[:12]}.json"
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, journal)  # the commit point
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)
    return journal


def _roll_forward(journal: Path, doc: dict) -> None:
    aside = doc["aside"]
    for src, dst in doc["moves"]:
        _apply(src, dst, aside)
    _fsync_folder(journal.parent)
    os.unlink(journal)  # the commit is complete
    for path in [*doc.get("cleanup", []), aside]:
        _remove(path)


def _journals(folder: Path) -> list[Path]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(folder / n for n in names if n.startswith(JOURNAL_PREFIX) and n.endswith(".json"))


def _temporary_child(path: str, folder: str, prefix: str = TEMP_PREFIX) -> bool:
    """True if ``path`` is an entry of ``folder`` named like crd_fast's temporary files (``prefix``)."""
    return os.path.dirname(path) == folder and os.path.basename(path).startswith(prefix)


def _safe_move(src: Optional[str], dst: str, folder: str) -> bool:
    """A move a journal of ``folder`` may make: a staged file beside its target, or an entry of a staging folder in
    ``folder`` onto (or the removal of) an entry of ``folder``. Nothing else, whatever a journal says."""
    if src is None:
        return os.path.dirname(dst) == folder
    beside = os.path.dirname(src) == os.path.dirname(dst) and os.path.basename(src).startswith(TEMP_PREFIX)
    staged = _temporary_child(os.path.dirname(src), folder) and os.path.dirname(dst) == folder
    return beside or staged


def _read_journal(journal: Path) -> Optional[dict]:
    """The journal's moves if it is one of this user's own, complete and within bounds (else None: left alone)."""
    try:
        if hasattr(os, "geteuid") and os.stat(journal).st_uid != os.geteuid():
            return None  # another user's: never act on it (in a shared folder it could name anything)
        doc = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folder = os.fspath(journal.parent)
    ok = (
        isinstance(doc, dict)
        and doc.get("format") == JOURNAL_FORMAT
        and isinstance(doc.get("aside"), str)
        and _temporary_child(doc["aside"], folder, ASIDE_PREFIX)
        and isinstance(doc.get("moves"), list)
        and all(
            isinstance(m, list)
            and len(m) == 2
            and (m[0] is None or isinstance(m[0], str))
            and isinstance(m[1], str)
            and _safe_move(m[0], m[1], folder)
            for m in doc["moves"]
        )
        and isinstance(doc.get("cleanup", []), list)
        and all(isinstance(c, str) and _temporary_child(c, folder) for c in doc.get("cleanup", []))
    )
    return doc if ok else None


def _recover_locked(folder: Path) -> None:
    for journal in _journals(folder):
        doc = _read_journal(journal)
        if doc is None:  # not ours, or not complete: a journal is renamed into place whole, so never ours
            continue
        _roll_forward(journal, doc)


def recover_folder(folder: PathLike, strict: bool = False) -> None:
    """Finish the commits a killed run left in ``folder`` (roll them forward). Readers call it with
    ``strict=False``: a folder they cannot write is left as it is."""
    p = Path(folder)
    if not _journals(p):
        return
    try:
        with folder_lock(p):
            _recover_locked(p)
    except OSError:
        if strict:
            raise


def commit_moves(
    folder: PathLike,
    moves: Sequence[tuple[Optional[PathLike], PathLike]],
    cleanup: Sequence[PathLike] = (),
    check: Optional[Callable[[], None]] = None,
) -> None:
    """Make every move (``src`` replaces ``dst``; ``src`` None removes ``dst``) as one commit: through a journal in
    ``folder`` under its lock, so a kill at any point leaves the old set or (after :func:`recover_folder`) the new
    one. ``check()`` runs under the lock first (and may refuse); ``cleanup``: staging paths removed once the
    commit is complete."""
    p = Path(folder)
    unsafe = [(s, d) for s, d in moves if not _safe_move(None if s is None else os.fspath(s), os.fspath(d), str(p))]
    if unsafe:  # recovery would refuse to act on such a journal: refuse to write it
        raise ValueError(f"moves outside the staged entries of {str(p)!r}: {unsafe}")
    with folder_lock(p):
        _recover_locked(p)
        if check is not None:
            check()
        doc = {
            "format": JOURNAL_FORMAT,
            "version": 1,
            "aside": os.fspath(Path(tempfile.mkdtemp(prefix=ASIDE_PREFIX, dir=p))),
            "moves": [[None if s is None else os.fspath(s), os.fspath(d)] for s, d in moves],
            "cleanup": [os.fspath(c) for c in cleanup],
        }
        _roll_forward(_write_journal(p, doc), doc)


# ---- leftovers --------------------------------------------------------------------------------------------
def _is_leftover(name: str) -> bool:
    return any(name.startswith(prefix) and name.endswith(suffix) for prefix, suffix in _LEFTOVERS)


def tidy_folder(folder: PathLike) -> None:
    """Roll forward interrupted commits in ``folder``, then remove crd_fast's leftovers of killed runs there: older
    than this run and held by no live process. A folder that does not exist (yet) or cannot be read is skipped."""
    p = Path(folder)
    try:
        names = os.listdir(p)
    except OSError:
        return
    if not any(is_temporary_name(n) for n in names):
        return
    try:
        with folder_lock(p):
            _recover_locked(p)
            for name in names:
                path = p / name
                if not _is_leftover(name) or not os.path.lexists(path):
                    continue
                try:
                    old = os.lstat(path).st_mtime < RUN_START
                except OSError:
                    continue
                if old and _abandoned(path):
                    _remove(path)
    except OSError:
        return


# ---- staged files -----------------------------------------------------------------------------------------
class StagedFile:
    """A temporary file beside ``target`` (its real path), held against :func:`tidy_folder` until released."""

    def __init__(self, target: Path, shown: PathLike, suffix: str = ".tmp") -> None:
        self.target, self.shown = target, shown
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=target.parent)
        except OSError as exc:
            raise write_error(exc, shown) from exc
        os.close(fd)
        self.path = Path(name)
        self._lock = hold(self.path)

    def finish(self, mode: int) -> None:
        """Set the permissions and flush the bytes to disk (before the rename that publishes them)."""
        try:
            with open(self.path, "rb+") as fh:
                os.fchmod(fh.fileno(), mode)  # after writing: some writers create their file 0600
                os.fsync(fh.fileno())
        except OSError as exc:
            raise write_error(exc, self.shown) from exc

    def discard(self) -> None:
        release(self._lock)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def release(self) -> None:
        release(self._lock)
