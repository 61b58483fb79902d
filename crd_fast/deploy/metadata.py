"""The metadata file that travels with an exported ONNX model (torch-free).

``model.onnx`` is accompanied by ``model.onnx.json``: one JSON document with the format name and
version, the crd_fast version, what was exported (whole detector or head only), the input and output
names and shapes, the detector's config, threshold and training score statistics, and the SHA-256 of
the ONNX file's bytes. The runtime refuses an ONNX file whose bytes do not match that hash, so a model
and the metadata of another model (or a truncated copy) are never paired silently.

The document is covered by a digest too: ``metadata_sha256`` is the SHA-256 of its canonical JSON form without the
hashes of the model files (``metadata_digest``), and the same value is stamped into the model itself (the ONNX
file's ``crd_fast`` property, an OpenVINO IR's ``crd_fast_metadata_sha256`` runtime info) before the model's own hash
is taken. An edited field (mean, std, resize, threshold, ...) no longer matches the digest; a digest recomputed by
hand no longer matches the one inside the model, whose hash the document holds. Exports written before carry neither
and are checked as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

from ..io.commit import recover_folder

FORMAT_NAME = "crd-fast-onnx"
FORMAT_VERSION = 1
#: Key under which a short identification is also written into the ONNX file's metadata_props.
ONNX_PROPS_KEY = "crd_fast"

PathLike = Union[str, os.PathLike]


class DeployError(ValueError):
    """An exported model or its metadata is missing, corrupt, mismatched, or given input of the wrong shape."""


def metadata_path_for(onnx_path: PathLike) -> Path:
    """The metadata file that belongs to ``onnx_path``: the same name with ``.json`` appended."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: The metadata digest's own field, and the fields it leaves out: hashes of model bytes that hold the digest.
DIGEST_FIELD = "metadata_sha256"
BYTE_HASH_FIELDS = ("onnx_sha256", "xml_sha256", "bin_sha256")


def metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta``'s canonical JSON (sorted keys, no spaces), leaving out ``metadata_sha256`` and the hashes
    of the model bytes (the digest is stamped into those bytes before they are hashed)."""
    body = {k: v for k, v in meta.items() if k != DIGEST_FIELD and k not in BYTE_HASH_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return sha256_bytes(text.encode("ascii"))


def check_metadata_digest(meta: dict[str, Any], meta_path: PathLike, stamped: Optional[str]) -> None:
    """Refuse a metadata document whose digest does not match its fields, or the digest ``stamped`` into the model
    (None: the model holds none, as exports before the digest)."""
    have = meta.get(DIGEST_FIELD)
    if have is None:
        if stamped is not None:
            raise DeployError(f"{meta_path}: its digest '{DIGEST_FIELD}' was removed (the model holds one)")
        return  # an export from before metadata digests: checked as before
    if have != metadata_digest(meta):
        raise DeployError(
            f"{meta_path}: metadata digest mismatch: the metadata was edited or corrupted after export "
            "(preprocessing, threshold or any other field)"
        )
    if stamped is not None and stamped != have:
        raise DeployError(
            f"{meta_path}: its digest does not match the one inside the model: metadata of another export"
        )


def read_onnx_and_metadata(
    onnx_path: PathLike, metadata_path: Optional[PathLike] = None
) -> tuple[bytes, dict[str, Any]]:
    """Read an exported model's bytes and its metadata, and check that they belong together."""
    onnx_p = Path(onnx_path)
    meta_p = Path(metadata_path) if metadata_path is not None else metadata_path_for(onnx_p)
    recover_folder(onnx_p.parent)  # an export killed after its commit point is completed first
    if not onnx_p.is_file():
        raise DeployError(f"{onnx_p}: no such ONNX file")
    if not meta_p.is_file():
        raise DeployError(
            f"{meta_p}: metadata file missing; it is written next to the ONNX file by crd_fast.deploy.export_onnx "
            f"(copy it along with {onnx_p.name}, or pass metadata_path=...)"
        )
    data = onnx_p.read_bytes()
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeployError(f"{meta_p}: metadata is not valid JSON (truncated or edited?): {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DeployError(f"{meta_p}: not a crd_fast ONNX metadata file (format {found!r}, expected {FORMAT_NAME!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DeployError(
            f"{meta_p}: metadata format version {meta.get('format_version')!r} is not supported "
            f"(this runtime reads {FORMAT_VERSION})"
        )
    digest = sha256_bytes(data)
    if meta.get("onnx_sha256") != digest:
        raise DeployError(
            f"{onnx_p}: does not match its metadata {meta_p.name} (SHA-256 {digest[:12]}... but the metadata "
            f"expects {str(meta.get('onnx_sha256'))[:12]}...): the ONNX file was modified or truncated, or the "
            f"metadata belongs to another export"
        )
    for key in ("inputs", "outputs", "head_only"):
        if key not in meta:
            raise DeployError(f"{meta_p}: metadata field {key!r} is missing")
    check_metadata_fields(meta, meta_p)
    check_metadata_digest(meta, meta_p, None)  # the model's stamp is compared once the runtime has read it
    return data, meta


#: Largest resize / crop accepted from metadata (as crd_fast.features.preprocess.MAX_IMAGE_SIDE).
MAX_IMAGE_SIDE = 4096


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_metadata_fields(meta: dict[str, Any], where: PathLike) -> None:
    """Refuse metadata whose fields have the wrong type or range (DeployError naming the field): an edited or
    corrupted document must not surface later as a KeyError or TypeError inside the runtime."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DeployError(f"{where}: metadata field {what}")

    need(isinstance(meta["head_only"], bool), f"'head_only'={meta['head_only']!r} is not true or false")
    for kind in ("inputs", "outputs"):
        items = meta[kind]
        named = isinstance(items, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items)
        need(named and len(items) >= 1, f"{kind!r} is not a list of named items")
    for item in meta["inputs"]:
        shape = item.get("shape")
        need(
            isinstance(shape, list)
            and 1 <= len(shape) <= 8
            and all(_int_in(d, 1, 1 << 20) or isinstance(d, str) or d is None for d in shape),
            f"'inputs' shape {shape!r} of {item['name']!r} is not a list of sizes",
        )
    need(isinstance(meta.get("config") or {}, dict), f"'config'={meta.get('config')!r} is not an object")
    batch = (meta.get("config") or {}).get("batch_size")
    need(batch is None or _int_in(batch, 1, 1 << 16), f"'config.batch_size'={batch!r} is not an integer in [1, 65536]")
    for key in ("threshold", "pixel_threshold"):
        value = meta.get(key)
        need(value is None or _finite(value), f"{key!r}={value!r} is not null or a finite number")
    stats = meta.get("train_score_stats")
    need(
        stats is None or (isinstance(stats, dict) and all(_finite(v) for v in stats.values())),
        f"'train_score_stats'={stats!r} is not null or an object of finite numbers",
    )
    if meta["head_only"]:
        return
    pre = meta.get("preprocess")
    need(isinstance(pre, dict), f"'preprocess'={pre!r} is not an object")
    resize, crop = pre.get("resize"), pre.get("crop")
    need(
        _int_in(crop, 1, MAX_IMAGE_SIDE) and _int_in(resize, crop, MAX_IMAGE_SIDE),
        f"'preprocess' resize={resize!r}, crop={crop!r} are not integers with 1 <= crop <= resize <= {MAX_IMAGE_SIDE}",
    )
    for key in ("mean", "std"):
        values = pre.get(key)
        need(
            isinstance(values, list)
            and len(values) == 3
            and all(_finite(v) for v in values)
            and (key == "mean" or all(v > 0 for v in values)),
            f"'preprocess.{key}'={values!r} is not 3 finite numbers",
        )


def check_expected(meta: dict[str, Any], expected: dict[str, Any], where: PathLike) -> None:
    """Refuse metadata whose values differ from what the caller expects (e.g. embedding='concat')."""
    sources = [meta, meta.get("config") or {}]
    for key, want in expected.items():
        for src in sources:
            if key in src:
                have = src[key]
                if isinstance(have, list) and isinstance(want, tuple):
                    want = list(want)
                if have != want:
                    raise DeployError(f"{where}: exported model has {key}={have!r}, expected {want!r}")
                break
        else:
            raise DeployError(f"{where}: exported model metadata has no field {key!r} to compare with {want!r}")
