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
detector that scores position-aware (``spatial_choice == "local"``) exports its LocalCRDHead (``head_of``): the
same graph operators plus batched MatMul / Einsum for the rank-k correction; so does a local head file (kind
``"local_crd_head"``), with exactly its stored values. Next to the ONNX
file, ``<file>.json`` holds the metadata (config, sizes, threshold, training score statistics, crd_fast
version, input and output names and shapes, SHA-256 of the ONNX bytes), which ``OnnxDetector`` checks.
Both files are written atomically.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .._version import __version__
from ..io.atomic import atomic_write
from ..io.model_file import ModelFileError
from ..models.head import CRDHead
from ..models.local_head import LocalCRDHead
from .imaging import IMAGENET_MEAN, IMAGENET_STD
from .local_head_file import LOCAL_HEAD_KIND, LocalDeployHead
from .metadata import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ONNX_PROPS_KEY,
    DeployError,
    PathLike,
    metadata_path_for,
    sha256_bytes,
)
from .precision import HEAD_KIND, DeployHead, check_precision, detector_info, variant_projection

#: Default opset (see the module docstring for why 17).
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(13, 21)
#: Parity the exporter checks on its own dummy input before writing (relative to the largest score).
EXPORT_CHECK_RTOL = 1e-3


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it says about itself."""

    onnx_path: Path
    metadata_path: Path
    metadata: dict[str, Any]


class HeadOnlyModel(nn.Module):
    """The head as an exportable module: one positional input per layer -> (image_scores, patch_maps)."""

    def __init__(self, head: Union[CRDHead, LocalCRDHead]) -> None:
        super().__init__()
        self.head = head

    def forward(self, *feature_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch_maps = self.head.torch_forward(list(feature_maps))
        return patch_maps.flatten(1).amax(dim=1), patch_maps


class _WholeModel(nn.Module):
    """extractor + head (pure-torch path) + mapper, with the same outputs as InferenceModel."""

    def __init__(self, extractor: nn.Module, head: Union[CRDHead, LocalCRDHead], mapper: nn.Module) -> None:
        super().__init__()
        self.extractor, self.head, self.mapper = extractor, head, mapper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patch_maps = self.head.torch_forward(self.extractor(x))
        return patch_maps.flatten(1).amax(dim=1), self.mapper(patch_maps), patch_maps


def _load_source(source: Any) -> tuple[Any, Optional[Union[DeployHead, LocalDeployHead]], dict[str, Any]]:
    """(detector or None, head file or None, provenance) from a CRDDetector, a detector file or a head file
    (global or local)."""
    from ..detector.detector import CRDDetector

    if isinstance(source, CRDDetector):
        return source, None, {"source": "CRDDetector (in memory)"}
    if isinstance(source, (DeployHead, LocalDeployHead)):
        return None, source, {"source": f"{type(source).__name__} (in memory)"}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "source must be a CRDDetector, a DeployHead, a LocalDeployHead or a model file path, got "
            f"{type(source).__name__}"
        )
    p = Path(source)
    provenance = {"source": str(p), "source_sha256": sha256_bytes(p.read_bytes()) if p.is_file() else None}
    try:
        return CRDDetector.load(p), None, provenance
    except ModelFileError as exc:
        if f"holds a {LOCAL_HEAD_KIND!r} model" in str(exc):
            return None, LocalDeployHead.load(p), provenance
        if f"holds a {HEAD_KIND!r} model" not in str(exc):
            raise
    return None, DeployHead.load(p), provenance


def _detector_from_head(head: Union[DeployHead, LocalDeployHead]) -> Any:
    """An (unfitted) detector with the backbone and preprocessing a head file's detector metadata describes."""
    from ..detector.detector import CRDDetector

    det_meta = head.detector or {}
    config = det_meta.get("config")
    if not isinstance(config, dict):
        raise DeployError(
            "this head file has no detector metadata (made from a bare scorer): export it with head_only=True "
            "and layer_channels=..., feature_shapes=..."
        )
    return CRDDetector(**{**config, "device": "cpu"})


def head_of(detector: Any, rank: Optional[int] = None) -> nn.Module:
    """The exportable head of a fitted detector: a CRDHead, or a LocalCRDHead when it scores position-aware.

    A detector whose ``spatial_choice`` is "local" gives a CPU copy of its inference model's LocalCRDHead;
    any other gives the CRDHead of its scorer's projection (``rank``: the rank-r W instead, global CRD only).
    Either is in eval mode with the fused path off (export traces the pure-torch path).
    """
    return _export_head(detector, rank)[0]


def _export_head(detector: Any, rank: Optional[int]) -> tuple[nn.Module, dict[str, Any]]:
    """``head_of`` plus what the export metadata records about the head (lam, rank, error bound)."""
    if getattr(detector, "spatial_choice", "global") == "local":
        if rank is not None:
            raise ValueError(
                f"rank={rank} makes a rank-r head of the global CRD; this detector scores with the position-aware "
                "(local) head, which has no rank-r form: export it without rank="
            )
        head = copy.deepcopy(detector.inference_model().head).cpu().eval()
        if not isinstance(head, LocalCRDHead):
            raise DeployError(f"a local detector's inference model has a {type(head).__name__}, not a LocalCRDHead")
        head.use_fused = False
        return head, {"lam": head.lam, "rank": None, "error_bound": None}
    want_rank = rank if rank is not None else detector.scorer.rank
    proj = variant_projection(detector.scorer, "fp64", want_rank)
    head = _head_module(
        proj.matrix, proj.offset, detector.embedding, int(detector.target_dim), list(detector.layer_channels)
    )
    return head, {"lam": proj.lam, "rank": want_rank, "error_bound": proj.error_bound}


def _head_module(
    projection_matrix: torch.Tensor, offset: torch.Tensor, embedding: str, target_dim: int, layer_channels: list[int]
) -> CRDHead:
    return CRDHead(projection_matrix, offset, embedding, target_dim, layer_channels, use_fused=False).eval()


def _to_fp16_initializers(model: Any, head: CRDHead) -> int:
    """Store the head's weight initializers (the folded matrix slices) as float16 + Cast; returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    folded = head.folded.detach().cpu().numpy()
    slices, start = [], 0
    for c in head.layer_channels or [folded.shape[1]]:
        slices.append(folded[:, start : start + c])
        start += c
    graph = model.graph
    casts, converted = [], 0
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        matrix = (
            arr.reshape(arr.shape[0], -1)
            if arr.ndim == 4 and arr.shape[2:] == (1, 1)
            else (arr if arr.ndim == 2 else None)
        )
        if matrix is None or not any(matrix.shape == s.shape and np.array_equal(matrix, s) for s in slices):
            continue
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


def _to_fp16_local_initializers(model: Any, head: LocalCRDHead) -> int:
    """Store a local head's weights (the folded matrix, S_p, K_p) as float16 + Cast; returns how many initializers.

    Found by value, whatever layout the exporter gave them (constant folding may transpose or reshape): an
    initializer whose sorted values equal a weight's is that weight. The offsets q_p and inv_b stay float32:
    q_p is subtracted from M y (cancellation), and both are small next to S (P d k).
    """
    import onnx
    from onnx import helper, numpy_helper

    folded = head.folded.detach().cpu().numpy()
    weights, start = [], 0
    for c in head.layer_channels or [folded.shape[1]]:
        weights.append(folded[:, start : start + c])
        start += c
    weights += [head.vectors.detach().cpu().numpy(), head.inner.detach().cpu().numpy()]
    by_size: dict[int, list[np.ndarray]] = {}
    for w in weights:
        by_size.setdefault(w.size, []).append(np.sort(w, axis=None))
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
            raise DeployError(f"the local head's weights do not fit in float16 (values up to {np.abs(arr).max():.3g})")
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


def export_onnx(
    source: Any,
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
        source: a fitted CRDDetector, a detector model file (``CRDDetector.save``), or a head file / DeployHead
            (``crd_fast.deploy.precision``) or local head file / LocalDeployHead (``crd_fast.deploy.local_head_file``);
            whole-detector export from a head file rebuilds the backbone from its detector metadata's config.
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
    detector, head_file, provenance = _load_source(source)

    # ---- what is exported -------------------------------------------------------------------------
    if detector is not None:
        if not detector.is_fitted:
            raise RuntimeError("the detector is not fitted yet: nothing to export")
        info = detector_info(detector)
        head, facts = _export_head(detector, rank)
        error_bound, stored_precision, want_rank, lam = facts["error_bound"], "fp64", facts["rank"], facts["lam"]
    else:
        assert head_file is not None
        local_file = isinstance(head_file, LocalDeployHead)
        if local_file and rank is not None:
            raise ValueError(
                f"rank={rank} makes the global head's rank-r W; a local head file has no such form (its own rank "
                "keeps per-position directions: make a local head file with rank= instead)"
            )
        if not local_file and rank is not None and rank != (head_file.rank or head_file.dim):
            raise ValueError(f"the head file has rank={head_file.rank}; make a head file of rank {rank} instead")
        det_meta = head_file.detector or {}
        if not det_meta.get("layer_channels"):
            raise DeployError("the head file has no detector metadata (layers, channels): it cannot be exported")
        info = dict(det_meta)
        lam, stored_precision = head_file.lam, head_file.precision
        if not head_only:
            detector = _detector_from_head(head_file)
        if local_file:
            error_bound, want_rank = None, None
            head = head_file.head(
                info["embedding"],
                int(info["target_dim"]),
                list(info["layer_channels"]),
                grid=tuple(info["patch_grid"]) if info.get("patch_grid") else None,  # None: the file's own grid
                use_fused=False,
            ).eval()
        else:
            error_bound, want_rank = head_file.error_bound, head_file.rank
            head = _head_module(
                head_file.matrix,
                head_file.offset,
                info["embedding"],
                int(info["target_dim"]),
                list(info["layer_channels"]),
            )
    local = isinstance(head, LocalCRDHead)
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
        module = _WholeModel(detector.extractor, head.to(device), detector.mapper.to(device))
        crop = int(info["crop"])
        dummy = (torch.randn(2, 3, crop, crop, device=device),)
        inputs = [{"name": "images", "shape": ["batch", 3, crop, crop], "dtype": "float32"}]
        outputs = [
            {"name": "image_scores", "shape": ["batch"]},
            {"name": "anomaly_maps", "shape": ["batch", crop, crop]},
            {"name": "patch_maps", "shape": ["batch", *info["patch_grid"]]},
        ]
    module.eval()

    # ---- trace and export ---------------------------------------------------------------------------
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter warns about its own deprecation and about shape checks it traces as constants
        # (this graph's shapes are static apart from the batch axis, which is declared dynamic below).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            dummy,
            buffer,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[i["name"] for i in inputs],
            output_names=[o["name"] for o in outputs],
            dynamic_axes={x["name"]: {0: "batch"} for x in inputs + outputs},
        )
    import onnx

    model = onnx.load_from_string(buffer.getvalue())
    if precision == "fp16":
        converted = _to_fp16_local_initializers(model, head) if local else _to_fp16_initializers(model, head)
        if converted == 0:
            raise DeployError("could not find the head's weights in the exported graph to store them in float16")
    op_types = check_default_domain(model)
    del model.metadata_props[:]
    props = {"format": FORMAT_NAME, "crd_fast_version": __version__, "head_only": head_only}
    model.metadata_props.add(key=ONNX_PROPS_KEY, value=json.dumps(props, sort_keys=True))
    model.producer_name, model.producer_version = "crd_fast", __version__
    onnx.checker.check_model(model)
    data = model.SerializeToString()

    if verify:
        _verify(data, module, dummy, [i["name"] for i in inputs], [o["name"] for o in outputs])

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "crd_fast_version": __version__,
        "kind": "head" if head_only else "detector",
        "head_only": head_only,
        "opset": opset,
        "precision": precision,
        "head_matrix_precision": stored_precision,
        "rank": want_rank,
        "spatial": "local" if local else "global",
        "local_rank": head.rank if local else None,
        "error_bound": error_bound,
        "lam": lam,
        "inputs": inputs,
        "outputs": outputs,
        "op_types": op_types,
        "preprocess": None
        if head_only
        else {
            "resize": int(info["resize"]),
            "crop": int(info["crop"]),
            # the backbone's own normalisation (older head files: ImageNet's)
            "mean": list(info.get("mean") or IMAGENET_MEAN),
            "std": list(info.get("std") or IMAGENET_STD),
        },
        **{
            k: info.get(k)
            for k in (
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
        },
        **provenance,
        "onnx_sha256": sha256_bytes(data),
    }
    onnx_path = Path(path)
    meta_path = Path(metadata_path) if metadata_path is not None else metadata_path_for(onnx_path)
    with atomic_write(onnx_path) as tmp:
        tmp.write_bytes(data)
    with atomic_write(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    return ExportResult(onnx_path, meta_path, meta)


def _verify(
    data: bytes, module: nn.Module, dummy: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str]
) -> None:
    """Run the serialised graph once with onnxruntime and compare with the torch module (catches export bugs)."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(input_names, dummy)})
    with torch.no_grad():
        want = [t.detach().cpu().numpy() for t in module(*dummy)]
    for name, g, w in zip(output_names, got, want):
        err = float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-30)
        if not err <= EXPORT_CHECK_RTOL:
            raise DeployError(
                f"the exported graph's {name!r} disagrees with torch (relative error {err:.3g} > "
                f"{EXPORT_CHECK_RTOL}); nothing was written"
            )
