"""Refit of the CRD head on the features an int8-quantized backbone produces (used by ``export_onnx_int8``).

The CRD score lam ||(C + lam I)^-1 (y - mu)|| weighs the low-variance directions of the training features
most. The int8 backbone's rounding noise is spread over all directions, so a head fitted on float32 features
sees it as large deviations in exactly those directions and inflates every score, normal and defective
alike. Fitted on the int8 backbone's own features, the head's statistics (mean, covariance; the local
model's per-position means and sketches) hold that noise as normal variation. See docs/DESIGN.md
"Compute precision".
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..core.embedding import embed_patches, patch_grids
from ..detector.detector import CRDDetector
from ..detector.reservoir import Reservoir
from ..detector.score_sample import SCORE_SAMPLE, score_statistics
from .metadata import DeployError


def feature_tensors(model: Any, head_nodes: set[str], shapes: Sequence[tuple[int, int, int]]) -> list[str]:
    """Names of the tensors the head reads from the backbone in ``model`` (an onnx ModelProto).

    They are the inputs of the ``head_nodes`` (every node outside the backbone) made by other nodes (the
    backbone's, or the DequantizeLinear after them): what the head sees, after the int8 rounding. Returns
    one per layer; the order is settled by ``order_features``.
    """
    produced = {out: node for node in model.graph.node for out in node.output}
    names: list[str] = []
    for node in model.graph.node:
        if node.name not in head_nodes:
            continue
        for name in node.input:
            maker = produced.get(name)
            if maker is not None and maker.name not in head_nodes and maker.op_type != "Constant" and name not in names:
                names.append(name)
    if len(names) != len(shapes):
        raise DeployError(
            f"the head reads {len(names)} tensors from the backbone ({names[:4]}), but the detector has "
            f"{len(shapes)} layers: cannot refit the head on the int8 features"
        )
    return names


def with_outputs(model: Any, names: Sequence[str]) -> bytes:
    """``model`` serialised with the tensors ``names`` added as float graph outputs."""
    from onnx import TensorProto, helper

    extended = copy.deepcopy(model)
    for name in names:
        extended.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return extended.SerializeToString()


def order_features(detector: CRDDetector, x: torch.Tensor, found: Sequence[np.ndarray]) -> list[int]:
    """For each layer of ``detector``, the index in ``found`` (the graph's feature tensors for batch ``x``).

    Each graph tensor is matched to the layer of its shape whose float32 features of ``x`` it is closest to
    (int8 rounding moves them a few percent; another layer's features are unrelated).
    """
    reference = [f.float().cpu().numpy() for f in detector.extract_features(x)]
    order: list[int] = []
    for ref in reference:
        errors = [
            float(np.linalg.norm(f - ref) / max(np.linalg.norm(ref), 1e-30)) if f.shape == ref.shape else np.inf
            for f in found
        ]
        best = int(np.argmin(errors))
        if not np.isfinite(errors[best]) or best in order:
            shapes = [f.shape for f in found]
            raise DeployError(
                f"cannot match the int8 graph's feature tensors (shapes {shapes}) to the detector's layers "
                f"(shapes {[r.shape for r in reference]})"
            )
        order.append(best)
    return order


def refit_on_graph(
    detector: CRDDetector, model: Any, head_nodes: set[str], images: Any
) -> tuple[CRDDetector, Reservoir, int]:
    """A copy of ``detector`` whose head statistics are fitted on ``model``'s backbone features of ``images``.

    ``model``: the quantized whole-detector graph (onnx ModelProto); ``head_nodes``: the names of its nodes
    outside the backbone. Every image of ``images`` is run through the graph's backbone (onnxruntime, CPU)
    and the feature maps go through the detector's own embedding into a fresh copy of its scoring model
    (``ScoringModel.fresh``, ``partial_fit`` on patch grids, as ``CRDDetector.partial_fit``). Returns the
    copy (its options, threshold and backbone unchanged), the reservoir sample of the normalised inputs (for
    the training score statistics) and the number of images.
    """
    import onnxruntime as ort

    shapes = [tuple(s) for s in detector.extractor.feature_shapes(detector.preprocess.crop)]
    names = feature_tensors(model, head_nodes, shapes)
    session = ort.InferenceSession(with_outputs(model, names), providers=["CPUExecutionProvider"])
    scorer = detector.model.fresh()
    reservoir: Reservoir[torch.Tensor] = Reservoir(SCORE_SAMPLE, detector.seed)
    order: Optional[list[int]] = None
    seen = 0
    for _, x in detector.iter_batches(images):
        found = session.run(names, {"images": x.detach().cpu().numpy().astype(np.float32)})
        if order is None:
            order = order_features(detector, x, found)
        maps = [torch.from_numpy(found[i]) for i in order]
        with torch.inference_mode():
            emb = embed_patches(maps, detector.embedding, detector.target_dim)
        scorer.partial_fit(patch_grids(emb))
        reservoir.extend_lazily(x.shape[0], lambda kept, x=x: {p: x[p].detach().to("cpu", copy=True) for p in kept})
        seen += x.shape[0]
    if seen == 0:
        raise ValueError("no calibration images were found")
    if not scorer.is_fitted:
        raise ValueError(f"the {scorer.name} model's refit needs more calibration images (got {seen})")
    refitted = copy.deepcopy(detector)
    refitted.install_fit(scorer, seen, reservoir)
    return refitted, reservoir, seen


def graph_score_statistics(data: bytes, inputs: Sequence[torch.Tensor], batch_size: int) -> Optional[dict[str, float]]:
    """Training score statistics (as ``CRDDetector.train_score_stats``) of the graph ``data`` on ``inputs``."""
    import onnxruntime as ort

    if not inputs:
        return None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.stack(list(inputs)).numpy().astype(np.float32)
    scores = [
        session.run(["image_scores"], {"images": x[s : s + batch_size]})[0] for s in range(0, x.shape[0], batch_size)
    ]
    return score_statistics(np.concatenate(scores).astype(np.float64))


def backbone_signature(model: Any, head_nodes: set[str]) -> list[tuple[Any, ...]]:
    """Every node outside ``head_nodes`` (backbone and QDQ) with its attributes and initializer values."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.name in head_nodes:
            continue
        values = tuple(numpy_helper.to_array(inits[n]).tobytes() for n in node.input if n in inits)
        attrs = tuple(a.SerializeToString() for a in node.attribute)
        out.append((node.name, node.op_type, tuple(node.input), tuple(node.output), attrs, values))
    return out


__all__ = ["refit_on_graph", "feature_tensors", "order_features", "graph_score_statistics", "backbone_signature"]
