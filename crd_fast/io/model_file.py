"""Reading and writing crd_fast model files.

A model file is a safetensors file whose metadata holds one JSON document under the key ``crd_fast``: the
format name and version, the crd_fast version, the kind of model, the model's own fields, a SHA-256 checksum of
every tensor (name, dtype, shape and bytes) and ``digest``, the kind of the file's digest. Since the digest kind
``"header+tensors"``, a second metadata key, ``crd_fast_sha256``, holds the SHA-256 of that JSON document's exact
text: it covers the header, and through the tensor checksum in it, the tensors. Loading checks all of it, so a
truncated, edited or foreign file is refused with an error naming the file and the problem; a file written before
(no ``digest`` field, no ``crd_fast_sha256``: digest kind ``"tensors"``) is checked as it always was.

A checksum is not a signature: it catches corruption and edits, not a forger who recomputes it.

Writes are validated first (``check``: the same validation ``load`` applies, run on what would be read back, so
nothing unloadable is written), checked against the output-safety rule (:mod:`crd_fast.io.safety`), and go to a
temporary file in the same folder renamed into place: a crash or an exception never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from .._version import __version__
from .atomic import PathLike, atomic_write
from .locking import exclusive_write
from .outputs import check_readable_file
from .safety import check_outputs

FORMAT_NAME = "crd-fast-model"
FORMAT_VERSION = 1
METADATA_KEY = "crd_fast"
#: The safetensors metadata key of the header digest (the SHA-256 of the JSON text under METADATA_KEY).
DIGEST_KEY = "crd_fast_sha256"
#: Digest kinds: what a file's checksums cover. Files without the ``digest`` field are of the older kind.
DIGEST_HEADER_AND_TENSORS = "header+tensors"
DIGEST_TENSORS = "tensors"
DIGEST_KINDS = (DIGEST_HEADER_AND_TENSORS, DIGEST_TENSORS)

#: ``check(tensors, meta, path)``: the validation a kind's loader applies to what it reads (raises ModelFileError).
StateCheck = Callable[[Mapping[str, "torch.Tensor"], dict, Any], Any]


class ModelFileError(ValueError):
    """A model file could not be read: missing, truncated, corrupt, of another format or inconsistent."""


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors file of ``tensors`` and ``metadata``, byte for byte the same for the same content: the library
    writes its metadata map in hash order, so its header is written again with the metadata keys sorted (the tensor
    entries, and so the data offsets, are kept as they are)."""
    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(metadata))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def header_digest(text: str) -> str:
    """SHA-256 of the model file's JSON header text (which holds the tensors' checksum)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digest_kind(meta: Mapping[str, Any]) -> str:
    """What the checksums of a file with metadata ``meta`` cover: "header+tensors", or "tensors" (older files)."""
    return meta.get("digest", DIGEST_TENSORS)


def write_model_file(
    path: PathLike,
    kind: str,
    tensors: Mapping[str, torch.Tensor],
    fields: Mapping[str, Any],
    *,
    check: Optional[StateCheck],
    inputs: Iterable[PathLike] = (),
) -> Path:
    """Write ``tensors`` and JSON-serialisable ``fields`` as a model file of ``kind``, atomically.

    ``check(tensors, meta, path)`` is the kind's load-time validation: it runs on exactly what ``read_model_file``
    would return for the new file, before anything is written, so an unloadable model is never written (and an
    existing good file at ``path`` is kept). It must be given; ``check=None`` says on purpose that there is none
    (tests that write corrupt files). ``inputs``: files the model was made from (a backbone weights file)
    that ``path`` must not overwrite.
    """
    check_outputs(files=[path], inputs=inputs)
    clean = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "crd_fast_version": __version__,
        "kind": kind,
        "checksum": tensor_checksum(clean),
        **fields,
        "digest": DIGEST_HEADER_AND_TENSORS,
    }
    text = json.dumps(meta, sort_keys=True)
    try:
        if check is not None:
            check(clean, json.loads(text), path)
    except ModelFileError as exc:
        raise ModelFileError(f"not written, it would not load back: {exc}") from exc
    with exclusive_write(path), atomic_write(path) as tmp:  # one writer at a time (crd_fast.io.locking)
        tmp.write_bytes(safetensors_bytes(clean, {METADATA_KEY: text, DIGEST_KEY: header_digest(text)}))
    return Path(path)


def read_model_file(path: PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a model file of ``kind``; return its tensors (on CPU) and metadata fields."""
    from safetensors import safe_open

    p = Path(path)
    try:
        check_readable_file(p, "model file")
    except FileNotFoundError:
        raise ModelFileError(f"{p}: no such model file") from None
    except PermissionError:
        raise ModelFileError(f"{p}: permission denied: cannot read the model file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{p}: is a directory, not a model file") from None
    except ValueError as exc:  # a device, FIFO or socket
        raise ModelFileError(f"{p}: not a model file: {exc}") from None
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except ModelFileError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated or malformed files
        raise ModelFileError(f"{p}: not a readable model file (truncated or corrupt?): {exc}") from exc
    if METADATA_KEY not in raw_meta:
        raise ModelFileError(f"{p}: not a crd_fast model file (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw_meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{p}: model metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{p}: not a crd_fast model file (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{p}: model file format version {meta.get('format_version')!r} is not supported "
            f"(this crd_fast {__version__} reads version {FORMAT_VERSION})"
        )
    _check_header_digest(p, meta, raw_meta)
    if meta.get("kind") != kind:
        raise ModelFileError(f"{p}: holds a {meta.get('kind')!r} model, expected {kind!r}")
    if meta.get("checksum") != tensor_checksum(tensors):
        raise ModelFileError(f"{p}: checksum mismatch: the tensors were modified or corrupted after saving")
    return tensors, meta


def _check_header_digest(p: Path, meta: dict[str, Any], raw_meta: Mapping[str, str]) -> None:
    """The header digest of a "header+tensors" file must match its JSON text; an older file (no ``digest`` field)
    has none and is checked as before (tensors only)."""
    stored = raw_meta.get(DIGEST_KEY)
    if "digest" not in meta:
        if stored is not None:
            raise ModelFileError(f"{p}: the header was edited: it has a header digest but its 'digest' field is gone")
        return
    if meta["digest"] != DIGEST_HEADER_AND_TENSORS:
        raise ModelFileError(
            f"{p}: unknown digest kind {meta['digest']!r} (this crd_fast {__version__} writes "
            f"{DIGEST_HEADER_AND_TENSORS!r} and reads files without one)"
        )
    if stored is None:
        raise ModelFileError(f"{p}: the header digest '{DIGEST_KEY}' is missing (removed or corrupted)")
    if stored != header_digest(raw_meta[METADATA_KEY]):
        raise ModelFileError(
            f"{p}: header digest mismatch: the model's settings (JSON header) were edited or corrupted after saving"
        )


def require(condition: bool, path: PathLike, message: str) -> None:
    """Raise ModelFileError naming ``path`` unless ``condition`` holds (for consistency checks)."""
    if not condition:
        raise ModelFileError(f"{path}: inconsistent model file: {message}")
