"""Range and type checks on a detector model file's metadata, before anything is built from it.

A hand-edited or corrupted file must fail with ModelFileError naming the field, not with an internal error
or an attempt to allocate terabytes (``crop = 1e6`` would make the backbone run on a 10^12-pixel image).
The scoring model checks its own fields and tensors (``ScoringModel.from_state``; the CRD scorers' through
``crd_fast.scorers._model_checks``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..choices import LAM_AUTO, MAX_BATCH_SIZE, MAX_SEED
from ..features.preprocess import MAX_IMAGE_SIDE
from ..io.model_file import PathLike, require
from ..scorers._model_checks import MAX_COUNT, MAX_DIM
from ..scoring.registry import model_names, spatial_modes


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sha256_or_none(value: Any) -> bool:
    return value is None or (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def check_detector_metadata(meta: Mapping[str, Any], path: PathLike) -> None:
    """Raise ModelFileError naming the first field of ``meta`` (and its ``config``) that is out of range."""
    config = meta["config"]
    checks = [
        ("backbone", isinstance(config["backbone"], str), "a string"),
        ("weights", config["weights"] is None or isinstance(config["weights"], str), "null or a string"),
        (
            "layers",
            isinstance(config["layers"], list)
            and 1 <= len(config["layers"]) <= 16
            and all(isinstance(v, str) for v in config["layers"]),
            "a list of layer names",
        ),
        ("embedding", isinstance(config["embedding"], str), "a string"),
        (
            "lam_rel",
            config["lam_rel"] == LAM_AUTO or (_finite(config["lam_rel"]) and config["lam_rel"] > 0),
            f"a positive number or {LAM_AUTO!r}",
        ),
        ("center", isinstance(config["center"], bool), "true or false"),
        (
            "rank",
            config["rank"] is None or _int_in(config["rank"], 1, MAX_DIM),
            f"null or an integer in [1, {MAX_DIM}]",
        ),
        ("resize", _int_in(config["resize"], 1, MAX_IMAGE_SIDE), f"an integer in [1, {MAX_IMAGE_SIDE}]"),
        ("crop", _int_in(config["crop"], 1, MAX_IMAGE_SIDE), f"an integer in [1, {MAX_IMAGE_SIDE}]"),
        ("device", isinstance(config["device"], str), "a string"),
        ("batch_size", _int_in(config["batch_size"], 1, MAX_BATCH_SIZE), f"an integer in [1, {MAX_BATCH_SIZE}]"),
        ("seed", _int_in(config["seed"], 0, MAX_SEED), "an integer in [0, 2**63)"),
        ("blur_sigma", _finite(config["blur_sigma"]) and config["blur_sigma"] >= 0, "a number >= 0"),
        ("target_dim", _int_in(config["target_dim"], 1, MAX_DIM), f"an integer in [1, {MAX_DIM}]"),
        ("spatial", config["spatial"] in spatial_modes(), f"one of {spatial_modes()}"),
        ("local_rank", _int_in(config["local_rank"], 1, MAX_DIM), f"an integer in [1, {MAX_DIM}]"),
        (
            "local_shrinkage",
            _finite(config["local_shrinkage"]) and 0 <= config["local_shrinkage"] <= 1,
            "a number in [0, 1]",
        ),
    ]
    for key, ok, expected in checks:
        require(ok, path, f"config field {key}={config[key]!r} is not {expected}")
    stats = meta.get("train_score_stats")
    top = [
        (
            "layer_channels",
            isinstance(meta.get("layer_channels"), list)
            and all(_int_in(c, 1, MAX_DIM) for c in meta["layer_channels"]),
            "a list of channel counts",
        ),
        ("n_images", _int_in(meta.get("n_images", 0), 0, MAX_COUNT), "an integer >= 0"),
        ("threshold", meta.get("threshold") is None or _finite(meta["threshold"]), "null or a finite number"),
        (
            "train_score_stats",
            stats is None or (isinstance(stats, dict) and all(_finite(v) for v in stats.values())),
            "null or an object of finite numbers",
        ),
        (
            "pixel_threshold",
            meta.get("pixel_threshold") is None or _finite(meta["pixel_threshold"]),
            "null or a finite number",
        ),
        (
            "weights_identity",
            isinstance(meta.get("weights_identity") or {}, dict)
            and _sha256_or_none((meta.get("weights_identity") or {}).get("state_sha256")),
            "an object (with state_sha256, when present, a SHA-256 hex digest)",
        ),
        (
            "spatial_choice",
            meta.get("spatial_choice", "global") in model_names(),
            f"a scoring model's name {model_names()}",
        ),
        ("selection", meta.get("selection") is None or isinstance(meta["selection"], dict), "null or an object"),
    ]
    for key, ok, expected in top:
        require(ok, path, f"metadata field {key}={meta.get(key)!r} is not {expected}")
