"""Reading and writing crd_fast model files.

A model file is a safetensors file whose metadata holds one JSON document under the key
``crd_fast``: the format name and version, the crd_fast version, the kind of model, the model's own
fields, and a SHA-256 checksum of every tensor (name, dtype, shape and bytes). Loading checks all of
it, so a truncated, edited or foreign file is refused with an error naming the file and the problem.
Writes go to a temporary file in the same folder and are renamed into place: a crash or an
exception never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from .._version import __version__
from .atomic import PathLike, atomic_write
from .locking import exclusive_write
from .outputs import check_readable_file

FORMAT_NAME = "crd-fast-model"
FORMAT_VERSION = 1
METADATA_KEY = "crd_fast"


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


def write_model_file(path: PathLike, kind: str, tensors: Mapping[str, torch.Tensor], fields: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and JSON-serialisable ``fields`` as a model file of ``kind``, atomically."""
    from safetensors.torch import save_file

    clean = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "crd_fast_version": __version__,
        "kind": kind,
        "checksum": tensor_checksum(clean),
        **fields,
    }
    text = json.dumps(meta, sort_keys=True)
    with exclusive_write(path), atomic_write(path) as tmp:  # one writer at a time (crd_fast.io.locking)
        save_file(clean, str(tmp), metadata={METADATA_KEY: text})
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
    if meta.get("kind") != kind:
        raise ModelFileError(f"{p}: holds a {meta.get('kind')!r} model, expected {kind!r}")
    if meta.get("checksum") != tensor_checksum(tensors):
        raise ModelFileError(f"{p}: checksum mismatch: the tensors were modified or corrupted after saving")
    return tensors, meta


def require(condition: bool, path: PathLike, message: str) -> None:
    """Raise ModelFileError naming ``path`` unless ``condition`` holds (for consistency checks)."""
    if not condition:
        raise ModelFileError(f"{path}: inconsistent model file: {message}")
