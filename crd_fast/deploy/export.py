"""ONNX export of a fitted detector (backbone + CRD head + anomaly map) or of its head alone.

    from crd_fast.deploy import export_onnx
    export_onnx("model.crd", "model.onnx")                      # whole detector: images -> scores and maps
    export_onnx("model.crd", "head.onnx", head_only=True)       # feature maps -> patch scores
    export_onnx(detector, "model16.onnx", precision="fp16", rank=512)

The graph uses only default-domain ONNX operators (Conv, AveragePool, Resize, Pad, ReduceMax, ...): the
head is exported through its pure-torch path, never the fused kernel. The opset is 17 by default: every
operator the model needs exists there in its current form, and it is the newest opset that onnxruntime
>= 1.13, TensorRT 8.6 and OpenVINO 2023 all read, so the file also runs on older edge runtimes (the
legacy TorchScript exporter is used; it is stable for these static-shape models, where torch.export would
add nothing). The batch axis is dynamic; image size and feature shapes are fixed.

With ``precision="fp16"`` the head's weights are stored as float16 initializers followed by a Cast to
float32 (computation stays float32); ``rank=r`` exports the rank-r W instead of M_pre (global CRD only). A
detector exports its scoring model's head (``ScoringModel.export_head``, ``head_of``): the position-aware model's
LocalCRDHead adds batched MatMul / Einsum for the rank-k correction; a head file exports its own head with exactly
its stored values. Next to the ONNX file, ``<file>.json`` holds the metadata (config, sizes, threshold, training
score statistics, crd_fast version, input and output names and shapes, SHA-256 of the ONNX bytes), which
``OnnxDetector`` checks; the metadata's own digest is stamped into the graph (``seal_export``). Both files are written
as one commit (a kill at any point leaves the old pair or the new one), after the output-safety check.

An export runs four steps, each its own function, so another format reuses the first three: ``resolve_export``
(what is exported: the module, its dummy inputs and names, the facts), ``trace_onnx`` (the graph's bytes),
``export_metadata`` (the JSON beside it) and ``write_export`` (both files, atomically).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .._version import __version__
from ..detector.detector import CRDDetector
from ..detector.persistence import MODEL_KIND as DETECTOR_KIND
from ..detector.persistence import detector_metadata
from ..io.atomic import atomic_write_many
from ..io.safety import check_outputs
from ..models.head_file import check_precision
from .head_files import HEAD_FILE_KINDS, AnyHead, ExportSource, file_kind
from .imaging import IMAGENET_MEAN, IMAGENET_STD
from .metadata import (
    DIGEST_FIELD,
    FORMAT_NAME,
    FORMAT_VERSION,
    ONNX_PROPS_KEY,
    DeployError,
    PathLike,
    metadata_digest,
    metadata_path_for,
    sha256_bytes,
)

#: Default opset (see the module docstring for why 17).
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(13, 21)
#: Parity the exporter checks on its own dummy input before writing (relative to the largest score).
EXPORT_CHECK_RTOL = 1e-3
#: Detector metadata fields the export metadata repeats.
_DETECTOR_FIELDS = (
    "config",
    "weights_identity",
    "layers",
    "layer_channels",
    "feature_shapes",
    "patch_grid",
    "resize",
    "crop",
    "embedding",
    "target_dim",
    "d",
    "lam_rel",
    "n_images",
    "n_patches",
    "threshold",
    "pixel_threshold",
    "train_score_stats",
)


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it says about itself."""

    onnx_path: Path
    metadata_path: Path
    metadata: dict[str, Any]


@dataclass
class ExportPlan:
    """What an export traces (``resolve_export``): the module and its dummy inputs, the input and output names and
    shapes, the head inside (for fp16 weights), the detector metadata and the head's facts (lam, rank, error bound,
    spatial model, ...), and where it came from."""

    module: nn.Module
    head: nn.Module
    dummy: tuple[torch.Tensor, ...]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    info: dict[str, Any]
    facts: dict[str, Any]
    provenance: dict[str, Any]
    head_only: bool


class HeadOnlyModel(nn.Module):
    """The head as an exportable module: one positional input per layer -> (image_scores, patch_maps)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *feature_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch_maps = self.head.torch_forward(list(feature_maps))
        return patch_maps.flatten(1).amax(dim=1), patch_maps


class WholeModel(nn.Module):
    """extractor + head (pure-torch path) + mapper, with the same outputs as InferenceModel."""

    def __init__(self, extractor: nn.Module, head: nn.Module, mapper: nn.Module) -> None:
        super().__init__()
        self.extractor, self.head, self.mapper = extractor, head, mapper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patch_maps = self.head.torch_forward(self.extractor(x))
        return patch_maps.flatten(1).amax(dim=1), self.mapper(patch_maps), patch_maps


def head_of(detector: CRDDetector, rank: Optional[int] = None) -> nn.Module:
    """The exportable head of a fitted detector: its scoring model's head on the CPU, in eval mode, with the fused
    path off (export traces the pure-torch path). ``rank``: a rank-r head, where the model has one (global CRD)."""
    return detector.model.export_head(detector.layout, rank)[0]


# ---- step 1: resolve ----------------------------------------------------------------------------------
def _load_source(source: ExportSource) -> tuple[Optional[CRDDetector], Optional[AnyHead], dict[str, Any]]:
    """(detector or None, head file or None, provenance) from a CRDDetector, a head file object, or the path of a
    detector file or a head file of any kind."""
    if isinstance(source, CRDDetector):
        return source, None, {"source": "CRDDetector (in memory)"}
    if isinstance(source, tuple(HEAD_FILE_KINDS.values())):
        return None, source, {"source": f"{type(source).__name__} (in memory)"}
    if not isinstance(source, (str, os.PathLike)):
        names = ", ".join(cls.__name__ for cls in HEAD_FILE_KINDS.values())
        raise TypeError(f"source must be a CRDDetector, a {names} or a model file path, got {type(source).__name__}")
    p = Path(source)
    provenance = {"source": str(p), "source_sha256": sha256_bytes(p.read_bytes()) if p.is_file() else None}
    head_cls = HEAD_FILE_KINDS.get(file_kind(p) or DETECTOR_KIND)
    if head_cls is not None:
        return None, head_cls.load(p), provenance
    return CRDDetector.load(p), None, provenance  # a detector file, or the loader's clear error


def _detector_from_head(head: AnyHead) -> CRDDetector:
    """An (unfitted) detector with the backbone and preprocessing a head file's detector metadata describes."""
    config = (head.detector or {}).get("config")
    if not isinstance(config, dict):
        raise DeployError(
            "this head file has no detector metadata (made from a bare scorer): export it with head_only=True "
            "and layer_channels=..., feature_shapes=..."
        )
    return CRDDetector(**{**config, "device": "cpu"})


def resolve_export(
    source: ExportSource,
    head_only: bool = False,
    rank: Optional[int] = None,
    layer_names: Optional[Sequence[str]] = None,
) -> ExportPlan:
    """What ``export_onnx`` traces for ``source`` (see its docstring): a fitted CRDDetector, a detector model file,
    or a head file (object or path) of any kind."""
    detector, head_file, provenance = _load_source(source)
    if detector is not None:
        if not detector.is_fitted:
            raise RuntimeError("the detector is not fitted yet: nothing to export")
        info = detector_metadata(detector)
        head, facts = detector.model.export_head(detector.layout, rank)
        facts = {"spatial": detector.model.name, "local_rank": None, "head_matrix_precision": "fp64", **facts}
    else:
        assert head_file is not None
        info = dict(head_file.detector or {})
        if not info.get("layer_channels"):
            raise DeployError("the head file has no detector metadata (layers, channels): it cannot be exported")
        head, facts = head_file.export_head(info["embedding"], int(info["target_dim"]), info["layer_channels"], rank)
        facts = {"local_rank": None, **facts}
        if not head_only:
            detector = _detector_from_head(head_file)
    names = list(layer_names or info["layers"])
    if len(names) != len(info["layer_channels"]):
        raise ValueError(f"layer_names has {len(names)} names for {len(info['layer_channels'])} layers")
    if head_only:
        module: nn.Module = HeadOnlyModel(head)
        dummy = tuple(torch.randn(2, *shape) for shape in info["feature_shapes"])
        inputs = [
            {"name": n, "shape": ["batch", *shape], "dtype": "float32"}
            for n, shape in zip(names, info["feature_shapes"])
        ]
        outputs = [
            {"name": "image_scores", "shape": ["batch"]},
            {"name": "patch_maps", "shape": ["batch", *info["patch_grid"]]},
        ]
    else:
        device = next(iter(detector.extractor.parameters())).device
        module = WholeModel(detector.extractor, head.to(device), detector.mapper.to(device))
        crop = int(info["crop"])
        dummy = (torch.randn(2, 3, crop, crop, device=device),)
        inputs = [{"name": "images", "shape": ["batch", 3, crop, crop], "dtype": "float32"}]
        outputs = [
            {"name": "image_scores", "shape": ["batch"]},
            {"name": "anomaly_maps", "shape": ["batch", crop, crop]},
            {"name": "patch_maps", "shape": ["batch", *info["patch_grid"]]},
        ]
    module.eval()
    return ExportPlan(module, head, dummy, inputs, outputs, info, facts, provenance, head_only)


# ---- step 2: trace --------------------------------------------------------------------------------------
def _store_half(model: Any, weights: Sequence[torch.Tensor]) -> int:
    """Store the initializers that hold ``weights`` as float16 + Cast to float32; returns how many.

    Found by value, whatever layout the exporter gave them (constant folding may transpose or reshape): an
    initializer whose sorted values equal a weight's is that weight.
    """
    import onnx
    from onnx import helper, numpy_helper

    by_size: dict[int, list[np.ndarray]] = {}
    for w in weights:
        arr = w.detach().cpu().float().numpy()
        by_size.setdefault(arr.size, []).append(np.sort(arr, axis=None))
    graph = model.graph
    casts, converted = [], 0
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or init.name.endswith("__fp16"):
            continue
        arr = numpy_helper.to_array(init)
        candidates = by_size.get(arr.size)
        if not candidates or not any(np.array_equal(np.sort(arr, axis=None), c) for c in candidates):
            continue
        if not np.isfinite(arr.astype(np.float16)).all():
            raise DeployError(f"the head's weights do not fit in float16 (values up to {np.abs(arr).max():.3g})")
        half_name = f"{init.name}__fp16"
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(arr.astype(np.float16), half_name))
        casts.append(
            helper.make_node("Cast", [half_name], [init.name], to=onnx.TensorProto.FLOAT, name=f"{init.name}__cast")
        )
        converted += 1
    for node in reversed(casts):
        graph.node.insert(0, node)
    return converted


def check_default_domain(model: Any, where: str = "exported graph") -> list[str]:
    """Sorted op types of ``model``; DeployError if any node is outside the default ONNX domain (a custom op)."""
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise DeployError(f"{where} contains custom operators {custom}: it would not run on a stock onnxruntime")
    return sorted({n.op_type for n in model.graph.node})


def trace_onnx(plan: ExportPlan, opset: int = DEFAULT_OPSET, precision: str = "fp32") -> tuple[bytes, list[str]]:
    """The ONNX bytes of ``plan``'s module (dynamic batch axis, default-domain operators, checked) and its op types.
    ``precision="fp16"`` stores the head's weights (``half_weights``) as float16."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter warns about its own deprecation and about shape checks it traces as constants
        # (this graph's shapes are static apart from the batch axis, which is declared dynamic below).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            plan.module,
            plan.dummy,
            buffer,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[i["name"] for i in plan.inputs],
            output_names=[o["name"] for o in plan.outputs],
            dynamic_axes={x["name"]: {0: "batch"} for x in plan.inputs + plan.outputs},
        )
    model = onnx.load_from_string(buffer.getvalue())
    if precision == "fp16" and _store_half(model, plan.head.half_weights()) == 0:
        raise DeployError("could not find the head's weights in the exported graph to store them in float16")
    op_types = check_default_domain(model)
    del model.metadata_props[:]
    props = {"format": FORMAT_NAME, "crd_fast_version": __version__, "head_only": plan.head_only}
    model.metadata_props.add(key=ONNX_PROPS_KEY, value=json.dumps(props, sort_keys=True))
    model.producer_name, model.producer_version = "crd_fast", __version__
    onnx.checker.check_model(model)
    return model.SerializeToString(), op_types


def verify_onnx(data: bytes, plan: ExportPlan) -> None:
    """Run the serialised graph once with onnxruntime and compare with the torch module (catches export bugs)."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i["name"] for i in plan.inputs]
    got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, plan.dummy)})
    with torch.no_grad():
        want = [t.detach().cpu().numpy() for t in plan.module(*plan.dummy)]
    for output, g, w in zip(plan.outputs, got, want):
        err = float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-30)
        if not err <= EXPORT_CHECK_RTOL:
            raise DeployError(
                f"the exported graph's {output['name']!r} disagrees with torch (relative error {err:.3g} > "
                f"{EXPORT_CHECK_RTOL}); nothing was written"
            )


# ---- step 3: metadata -----------------------------------------------------------------------------------
def export_metadata(plan: ExportPlan, data: bytes, opset: int, precision: str, op_types: list[str]) -> dict[str, Any]:
    """The JSON document written beside the graph (crd_fast/deploy/metadata.py reads and checks it)."""
    info, facts = plan.info, plan.facts
    preprocess = None
    if not plan.head_only:
        preprocess = {
            "resize": int(info["resize"]),
            "crop": int(info["crop"]),
            # the backbone's own normalisation (older head files: ImageNet's)
            "mean": list(info.get("mean") or IMAGENET_MEAN),
            "std": list(info.get("std") or IMAGENET_STD),
        }
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "crd_fast_version": __version__,
        "kind": "head" if plan.head_only else "detector",
        "head_only": plan.head_only,
        "opset": opset,
        "precision": precision,
        "head_matrix_precision": facts["head_matrix_precision"],
        "rank": facts["rank"],
        "spatial": facts["spatial"],
        "local_rank": facts["local_rank"],
        "error_bound": facts["error_bound"],
        "lam": facts["lam"],
        "inputs": plan.inputs,
        "outputs": plan.outputs,
        "op_types": op_types,
        "preprocess": preprocess,
        **{k: info.get(k) for k in _DETECTOR_FIELDS},
        **plan.provenance,
        "onnx_sha256": sha256_bytes(data),
    }


# ---- step 4: write --------------------------------------------------------------------------------------
def stamp_onnx(data: bytes, digest: str) -> bytes:
    """The ONNX bytes with the metadata digest added to their ``crd_fast`` property (crd_fast/deploy/metadata.py)."""
    import onnx

    model = onnx.load_from_string(data)
    props = {p.key: p.value for p in model.metadata_props}
    mine = json.loads(props.get(ONNX_PROPS_KEY) or "{}")
    mine[DIGEST_FIELD] = digest
    del model.metadata_props[:]
    for key, value in {**props, ONNX_PROPS_KEY: json.dumps(mine, sort_keys=True)}.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def seal_export(data: bytes, meta: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(graph, metadata) bound together: the metadata's digest stamped into the graph, the stamped graph's SHA-256
    in the metadata (crd_fast/deploy/metadata.py)."""
    meta = {k: v for k, v in meta.items() if k not in (DIGEST_FIELD, "onnx_sha256")}
    digest = metadata_digest(meta)
    data = stamp_onnx(data, digest)
    return data, {**meta, DIGEST_FIELD: digest, "onnx_sha256": sha256_bytes(data)}


def write_export(
    data: bytes, meta: dict[str, Any], path: PathLike, metadata_path: Optional[PathLike] = None
) -> ExportResult:
    """Seal the graph and its metadata (:func:`seal_export`) and write both (metadata default: ``path`` + ".json") as
    one commit: a kill at any point leaves the old pair or the new one (crd_fast/io/commit.py)."""
    onnx_path = Path(path)
    meta_path = Path(metadata_path) if metadata_path is not None else metadata_path_for(onnx_path)
    check_outputs(files=[onnx_path, meta_path])
    data, meta = seal_export(data, meta)
    with atomic_write_many([onnx_path, meta_path]) as (onnx_tmp, meta_tmp):
        onnx_tmp.write_bytes(data)
        meta_tmp.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    return ExportResult(onnx_path, meta_path, meta)


def export_onnx(
    source: ExportSource,
    path: PathLike,
    head_only: bool = False,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    rank: Optional[int] = None,
    metadata_path: Optional[PathLike] = None,
    layer_names: Optional[list[str]] = None,
    verify: bool = True,
) -> ExportResult:
    """Export a fitted detector (or its head) to ONNX, with its metadata JSON beside it.

    Args:
        source: a fitted CRDDetector, a detector model file (``CRDDetector.save``), or a head file of any kind (a
            DeployHead or LocalDeployHead, or its file); whole-detector export from a head file rebuilds the
            backbone from its detector metadata's config.
        path: the .onnx file to write (its metadata goes to ``metadata_path``, default ``path`` + ".json").
        head_only: export only the head: inputs are the layer feature maps (named after the layers, e.g.
            "layer2", "layer3"), outputs "image_scores" (B,) and "patch_maps" (B, h, w). Otherwise the input is
            "images" (B, 3, crop, crop) normalised and the outputs "image_scores", "anomaly_maps", "patch_maps".
        opset: ONNX opset (default 17).
        precision: "fp32" (default, exact float32 head) or "fp16" (head weights stored as float16).
        rank: export the rank-r W instead of the detector's own projection (None: keep the detector's).
        layer_names: input names for a head-only export (default: the detector's layer names).
        verify: run the written graph once with onnxruntime on a random input and compare with torch.
    """
    if precision not in ("fp32", "fp16"):
        check_precision(precision)
        raise ValueError(f"ONNX export supports precision 'fp32' or 'fp16', got {precision!r}")
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, got {opset!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    for name, flag in (("head_only", head_only), ("verify", verify)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    meta_path = Path(metadata_path) if metadata_path is not None else metadata_path_for(path)
    # before any work: the graph and its sidecar may replace no input, device or folder (crd_fast.io.safety)
    check_outputs(files=[path, meta_path], inputs=[source] if isinstance(source, (str, os.PathLike)) else [])
    plan = resolve_export(source, head_only, rank, layer_names)
    data, op_types = trace_onnx(plan, opset, precision)
    if verify:
        verify_onnx(data, plan)
    meta = export_metadata(plan, data, opset, precision, op_types)
    return write_export(data, meta, path, metadata_path)
