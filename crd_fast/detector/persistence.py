"""A detector's model file: one safetensors file with JSON metadata, written by ``save`` and read by ``load``.

The file holds the detector's options (``config``), the identity of its backbone weights, its feature layout,
thresholds and training score statistics, and its scoring model's own tensors and fields
(``ScoringModel.state``; the model's name under ``spatial_choice``) with the label-free choice's record
(``selection``). Loading rebuilds the detector from the stored options, checks that the backbone gives the stored
feature layout, and lets the scoring model check and rebuild itself (docs/DESIGN.md "Detector files").
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn as nn

from ..choices import WEIGHT_SOURCES
from ..features.backbone import BackboneWeightsError, module_state_sha256, same_weights, weights_identity
from ..io.model_file import ModelFileError, PathLike, read_model_file, require, write_model_file
from ..scoring.registry import model_class, model_names
from ..selection.record import SelectionRecord
from .config import OPTIONS, RUNTIME_OPTIONS, DetectorConfig
from .model_checks import check_detector_metadata

if TYPE_CHECKING:
    from .detector import CRDDetector

MODEL_KIND = "crd_detector"
#: What a model file written before compute precisions existed was fitted and scored with.
LEGACY_PRECISION = "fp32"
#: Model files written before the spatial option: the global CRD (their lam_rel is a number).
LEGACY_SPATIAL = {"spatial": "global", "local_rank": 32, "local_shrinkage": 0.5}
#: The scoring model of a file without ``spatial_choice`` (a global fit with explicit options, or older).
LEGACY_MODEL = "global"


def detector_metadata(det: "CRDDetector") -> dict[str, Any]:
    """Everything about a fitted detector that head files and export metadata record (JSON-serialisable)."""
    shapes = [list(s) for s in det.extractor.feature_shapes(det.preprocess.crop)]
    summary = det.model.summary()
    return {
        "config": det.config,
        "weights_identity": det.weights_identity,
        "layers": list(det.layers),
        "layer_channels": list(det.layer_channels),
        "feature_shapes": shapes,
        "patch_grid": list(det.patch_grid),
        "resize": det.preprocess.resize,
        "crop": det.preprocess.crop,
        "mean": list(det.preprocess.mean),
        "std": list(det.preprocess.std),
        "embedding": det.embedding,
        "target_dim": det.target_dim,
        "d": det.dim,
        "lam_rel": summary["lam_rel"],
        "n_images": det.n_images,
        "n_patches": summary["n_patches"],
        "threshold": det.threshold,
        "pixel_threshold": det.pixel_threshold,
        "train_score_stats": det.train_score_stats,
    }


def save_detector(det: "CRDDetector", path: PathLike) -> None:
    """Write ``det`` (fitted) to ``path`` atomically (see the module docstring)."""
    if not det.is_fitted:
        raise RuntimeError("this CRDDetector is not fitted yet: nothing to save")
    model = det.model
    tensors, model_fields = model.state()
    summary = model.summary()
    fields: dict[str, Any] = {
        "config": det.config,
        "weights_identity": det.weights_identity,
        "backbone": det.backbone_name,
        "layers": list(det.layers),
        "layer_channels": det.layer_channels,
        "patch_grid": list(det.patch_grid),
        "resize": det.preprocess.resize,
        "crop": det.preprocess.crop,
        "embedding": det.embedding,
        "d": det.dim,
        "lam": summary["lam"],
        "lam_rel": summary["lam_rel"],
        "n_images": det.n_images,
        "n_patches": summary["n_patches"],
        "train_score_stats": det.train_score_stats,
        "threshold": det.threshold,
        **model_fields,
    }
    if det.pixel_threshold is not None:  # only then: a file without one keeps the earlier content exactly
        fields["pixel_threshold"] = det.pixel_threshold
    if det.selection is not None or model.name != LEGACY_MODEL:  # a global fit with explicit options keeps the
        fields["spatial_choice"] = model.name  # earlier content exactly
        fields["selection"] = None if det.selection is None else det.selection.to_dict()
    weights = det.config.get("weights")
    weights_file = [weights] if isinstance(weights, str) and weights not in WEIGHT_SOURCES else []
    write_model_file(path, MODEL_KIND, tensors, fields, check=check_detector_state, inputs=weights_file)


class OptionMismatchError(ModelFileError):
    """``load`` was asked for an option that differs from the model's own (the model would change)."""


class _UserModule:
    """Stands in for a user backbone module when a stored config is checked without building the detector."""


def check_detector_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: PathLike
) -> tuple[dict[str, Any], dict[str, Any], Any, Optional[SelectionRecord]]:
    """``load``'s checks that need no backbone, on a file's tensors and metadata: the complete, valid config (as
    ``DetectorConfig`` accepts it), every field's range, the scoring model (its own ``from_state``) and the
    selection record. Returns (stored config, metadata with it, scoring model, record); ModelFileError naming
    ``path`` otherwise. ``save`` runs it on what it would write, so an unloadable model is never written."""
    stored = meta.get("config")
    if isinstance(stored, dict):  # files from before compute precisions / before the spatial option
        stored = {"precision": LEGACY_PRECISION, **LEGACY_SPATIAL, **stored}
    require(isinstance(stored, dict) and set(OPTIONS) <= set(stored), path, "metadata has no complete 'config'")
    meta = {**meta, "config": stored}
    check_detector_metadata(meta, path)
    custom = str(stored["backbone"]).startswith("custom:")
    try:
        DetectorConfig(**{**stored, "backbone": _UserModule() if custom else stored["backbone"]})
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot rebuild the detector from its stored config: {exc}") from exc
    model, record = _scoring_model(meta, tensors, path)
    return stored, meta, model, record


def load_detector(
    cls: type, path: PathLike, device: Optional[Union[str, torch.device]] = None, **expected: Any
) -> "CRDDetector":
    """``CRDDetector.load``: read, check and rebuild a detector from ``path`` (see its docstring)."""
    tensors, meta = read_model_file(path, MODEL_KIND)
    stored, meta, model, record = check_detector_state(tensors, meta, path)
    unknown = sorted(set(expected) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown detector option(s) {unknown}; known: {', '.join(OPTIONS)}")
    ident = meta.get("weights_identity") or {}
    init = dict(stored)
    for key, want in expected.items():
        init[key] = _requested_option(path, key, want, stored, ident)
    if device is not None:
        init["device"] = device
    elif str(init["device"]) not in ("cpu", "auto") and not torch.cuda.is_available():
        init["device"] = "cpu"  # a run-time choice of the machine that fitted it, not part of the model
    if str(init["backbone"]).startswith("custom:") and not isinstance(init["backbone"], nn.Module):
        raise ModelFileError(
            f"{path}: the model was made with a user backbone module ({stored['backbone']}); "
            "pass it as CRDDetector.load(path, backbone=module)"
        )
    moved_weights_file = ident.get("kind") == "file" and "weights" not in expected
    if moved_weights_file and os.path.isfile(init["weights"]):
        found = weights_identity(init["weights"], stored["seed"], stored["backbone"])
        require(
            found.get("sha256") == ident.get("sha256"),
            path,
            f"weights file {init['weights']} changed since the model was saved (SHA-256 differs)",
        )
    try:
        det = cls(**init)
    except BackboneWeightsError as exc:
        if moved_weights_file:
            raise BackboneWeightsError(
                f"{exc} (the model {path} was fitted with this weights file; "
                "pass CRDDetector.load(path, weights=<its new path>) if it moved)"
            ) from exc
        raise
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot rebuild the detector from its stored config: {exc}") from exc
    require(  # weights known by their bytes (a file, HED's, a package's) must still be those bytes
        "sha256" not in ident or same_weights(det.weights_identity, ident),
        path,
        f"the backbone weights changed since the model was saved: {ident} then, {det.weights_identity} now",
    )
    require(
        list(det.patch_grid) == meta.get("patch_grid"),
        path,
        f"crop {det.preprocess.crop} gives a {det.patch_grid} patch grid, the file says {meta.get('patch_grid')}",
    )
    require(
        det.layer_channels == meta.get("layer_channels"),
        path,
        f"the backbone gives layer channels {det.layer_channels}, the file says {meta.get('layer_channels')}",
    )
    positions = det.patch_grid[0] * det.patch_grid[1]
    require(
        model.dim == det.dim and model.positions in (None, positions),
        path,
        f"the {model.name} model has d={model.dim} and {model.positions} positions; the features give d={det.dim} "
        f"and {positions} positions ({det.patch_grid[0]}x{det.patch_grid[1]})",
    )
    det.install_loaded(model, record, int(meta.get("n_images", 0)), meta.get("train_score_stats"))
    threshold = meta.get("threshold")
    require(threshold is None or isinstance(threshold, (int, float)), path, f"threshold {threshold!r} is not a number")
    det.set_threshold(threshold)
    det.set_pixel_threshold(meta.get("pixel_threshold"))  # absent before pixel thresholds; checked on load
    return det


def _scoring_model(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: PathLike
) -> tuple[Any, Optional[SelectionRecord]]:
    """The file's scoring model (checked by its own ``from_state``) and its selection record."""
    name = meta.get("spatial_choice", LEGACY_MODEL)  # absent: a global fit with explicit options, or older
    asked = meta["config"].get("spatial", LEGACY_MODEL)
    require(name in model_names(), path, f"spatial_choice {name!r} is not a known scoring model {model_names()}")
    require(asked in ("auto", name), path, f"the file's spatial model is {name!r} but its config asks {asked!r}")
    model = model_class(name).from_state(tensors, meta, path)
    require(model.dim == meta.get("d"), path, f"the {name} model has d={model.dim}, the file says d={meta.get('d')}")
    raw = meta.get("selection")
    try:
        record = None if raw is None else SelectionRecord.from_dict(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelFileError(f"{path}: the selection record is unusable: {exc}") from exc
    return model, record


def _requested_option(path: PathLike, key: str, want: Any, stored: dict[str, Any], ident: dict[str, Any]) -> Any:
    """The value to build with when ``load`` is asked for option ``key`` = ``want``.

    Run-time options take the requested value; the others must describe the stored model: a user
    module by its class name, weights by their identity (a file by its SHA-256, wherever it is now),
    the seed only where it made the weights, everything else by its validated value.
    """
    if key in RUNTIME_OPTIONS or (key == "seed" and ident.get("kind") != "random"):
        return want
    if key == "backbone" and isinstance(want, nn.Module):
        if f"custom:{type(want).__name__}" != stored[key]:
            raise OptionMismatchError(
                f"{path}: the model was made with backbone {stored[key]!r}, not a {type(want).__name__} module"
            )
        want_hash, stored_hash = module_state_sha256(want), ident.get("state_sha256")
        if stored_hash is not None and want_hash != stored_hash:  # files before this check have no hash
            raise OptionMismatchError(
                f"{path}: the {type(want).__name__} module passed has other weights than "
                f"the one the model was fitted with (state-dict SHA-256 {want_hash[:12]}... != "
                f"{stored_hash[:12]}...); scores would change"
            )
        return want
    if key == "weights":
        asked = weights_identity(DetectorConfig.check(key, want), stored["seed"], stored["backbone"])
        if not same_weights(asked, ident):
            raise OptionMismatchError(
                f"{path}: the model was made with weights {ident}, but weights={want!r} ({asked}) was requested"
            )
        return want
    if _jsonable(DetectorConfig.check(key, want)) != _jsonable(DetectorConfig.check(key, stored[key])):
        raise OptionMismatchError(
            f"{path}: the model was made with {key}={stored[key]!r}, but {key}={want!r} was requested"
        )
    return want


def _jsonable(value: Any) -> Any:
    """Tuples to lists etc., so requested and stored option values compare as JSON does."""
    return json.loads(json.dumps(value))


__all__ = [
    "LEGACY_MODEL",
    "MODEL_KIND",
    "OptionMismatchError",
    "check_detector_state",
    "detector_metadata",
    "load_detector",
    "save_detector",
]
