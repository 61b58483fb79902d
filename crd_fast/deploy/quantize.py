"""int8 ONNX: the whole-detector export with its backbone quantized statically (onnxruntime.quantization).

    from crd_fast.deploy.quantize import export_onnx_int8
    export_onnx_int8("model.crd", "model_int8.onnx", calibration="train/good")   # + model_int8.onnx.json

For processors without bf16: the backbone's convolutions run as int8 (QDQ format: per-channel int8
weights, uint8 activations, the u8s8 kernels VNNI accelerates), with activation ranges calibrated
on the training images (see below for how). The CRD head stays float32: its score ||P y - q|| is a difference of
large, nearly equal vectors, which 8-bit activations would not resolve; the graph is quantized up to the
feature maps and dequantized there. ``OnnxDetector`` runs the file like any other export (its metadata
says ``precision: "int8"``). On a processor without VNNI pass ``reduce_range=True`` (7-bit weights),
which avoids the saturation of the AVX2 u8s8 instructions.

The head is refitted on the int8 backbone (``refit_head=True``, the default): the CRD score
lam ||(C + lam I)^-1 (y - mu)|| weighs the low-variance directions of the training features most, and the
int8 rounding noise, spread over all directions, lands in them; a head fitted on float32 features takes
that noise for deviation and inflates every score (on the elpv development set the image AUROC fell from
0.713 to 0.585). So the quantized graph is run on ALL the calibration images, the head's statistics (global
CRD, or the local model's per-position means and sketches) are fitted on the feature maps it produces with
the detector's own code, and a copy of the detector holding them is exported and quantized again (same
backbone, weights and calibrated ranges: checked). The training score statistics in the metadata are the int8
graph's; the threshold is the model's (set on float32 scores). The model file is not changed.

The backbone's first convolution stays float32 (``float_stem=True``, the default): quantizing it rounds the
normalised images themselves to 8 bits, the largest noise left after the refit (elpv: image AUROC -0.013
against float32 ONNX with it quantized, -0.008 without; stone -0.030 and -0.003), for 1-2% of the
backbone's multiply-adds (layer3 and below).

Activation ranges come from the 99.999th percentile of each tensor's |activations| over the calibration
images (``calibration_method="percentile"``, the default; onnxruntime's histogram calibrator, 2048 bins,
clipped to the observed [min, max]), not from their extremes ("minmax"): a uint8 step is range / 255, and a
tensor's extremes are a handful of its millions of values, so MinMax rounds all the others more coarsely than
they need. On the generated categories the percentile ranges are 2-23% narrower (median 7-11%); the clipped
top 0.001% saturates, and the refitted head takes what the clip does to normal
images. Against float32 ONNX (generated categories, 30 training images, 20 + 20 test): cap -0.015 -> +0.005,
stone -0.003 -> +0.020, fabric -0.008 -> -0.005 image AUROC with MinMax -> percentile; on the elpv
development set -0.008 -> -0.010 (22 more of its 10,000 good/defective pairs out of order: within the 0.01
target, not better). Calibrating the percentile on all 200 elpv training images instead of 32 gave -0.013,
so the count stays 32. "entropy" (KL thresholds) and symmetric activations were worse on cap (-0.013,
-0.025). The histogram
calibrators are fed one batch per call (``CalibStridedMinMax=1``): onnxruntime stacks all batches of a call
into one array, which failed ("inhomogeneous shape") when the last batch was smaller, and holds every
intermediate tensor of the call in memory. Figures and commands: bench/RESULTS.md "bf16 and int8 ONNX
against float32".
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ..detector.detector import CRDDetector
from ..io.safety import check_outputs, path_inputs
from .export import ExportResult, export_onnx, write_export
from .metadata import DeployError, PathLike, metadata_path_for, sha256_bytes
from .quantized_refit import backbone_signature, graph_score_statistics, refit_on_graph

logger = logging.getLogger(__name__)

#: Calibration images used at most (the first ones; all 200 elpv training images did worse: module docstring).
DEFAULT_CALIBRATION_IMAGES = 32
#: Node-name prefix of the backbone in the exported graph (torch.onnx names nodes by module path).
BACKBONE_SCOPE = "/extractor/"


def calibration_batches(
    source: Union[CRDDetector, PathLike], images: Any, limit: int, batch_size: int = 8
) -> Iterator[np.ndarray]:
    """Normalised (B, 3, crop, crop) float32 batches of up to ``limit`` ``images`` (the detector's preprocessing)."""
    det = source if isinstance(source, CRDDetector) else CRDDetector.load(source)
    seen = 0
    for _, x in det.iter_batches(images):
        x = x[: limit - seen]
        seen += x.shape[0]
        for s in range(0, x.shape[0], batch_size):
            yield x[s : s + batch_size].cpu().numpy().astype(np.float32)
        if seen >= limit:
            return


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the batches (one input named "images").

    It holds the batches (normalised images: a few MB) and supports ``set_range``, so that ``quantize_static``
    (``CalibStridedMinMax=1``) hands them to the calibrator one batch per ``collect_data`` call: the histogram
    calibrators stack every batch of a call with ``np.asarray`` (a smaller last batch made the list
    "inhomogeneous" and failed) and keep all intermediate tensors of a call in memory. MinMax merges the
    ranges of the calls by min and max: the same ranges as one call.
    """

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self.batches = list(batches)
        self.count = sum(b.shape[0] for b in self.batches)
        self._range = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = iter(self.batches[start_index:end_index])

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        batch = next(self._range, None)
        return None if batch is None else {"images": batch}


def stem_convolution(model: Any) -> str:
    """The name of the backbone's first Conv in ``model`` (ONNX graphs are in topological order: the stem)."""
    for node in model.graph.node:
        if node.op_type == "Conv" and node.name.startswith(BACKBONE_SCOPE):
            return node.name
    raise DeployError(f"no backbone convolution (named {BACKBONE_SCOPE}...) in the exported graph")


#: Calibration methods (onnxruntime's CalibrationMethod names): MinMax, or the histogram ones.
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
#: The export's calibration method (see the module docstring).
DEFAULT_CALIBRATION_METHOD = "percentile"


@dataclass(frozen=True)
class QuantizeSettings:
    """How the backbone is quantized (see ``export_onnx_int8`` for each field)."""

    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    reduce_range: bool = False
    float_stem: bool = True
    calibration_method: str = DEFAULT_CALIBRATION_METHOD
    per_channel: bool = True
    symmetric_activations: bool = False
    float_nodes: tuple[str, ...] = ()
    opset: int = 17

    def check(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        n = self.calibration_images
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"calibration_images must be a positive integer, got {n!r}")
        for name in ("reduce_range", "float_stem", "per_channel", "symmetric_activations"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"calibration_method must be one of {sorted(CALIBRATION_METHODS)}, got {self.calibration_method!r}"
            )
        if not all(isinstance(n, str) and n for n in self.float_nodes):
            raise TypeError(f"float_nodes must be node names (non-empty strings), got {list(self.float_nodes)!r}")


def _quantized(
    detector: CRDDetector, tmp: Path, tag: str, calibration: Any, settings: QuantizeSettings
) -> tuple[ExportResult, Any, set[str], list[str], int]:
    """Export ``detector`` to float32 ONNX and quantize its backbone (QDQ, ranges calibrated on up to
    ``settings.calibration_images`` of ``calibration``): (the float32 export, the quantized onnx ModelProto, the
    names of the nodes outside the backbone, the backbone nodes kept float, the number of calibration images)."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    fp32 = export_onnx(detector, tmp / f"{tag}_fp32.onnx", opset=settings.opset)
    prepared = tmp / f"{tag}_prepared.onnx"
    # onnxruntime's recommended preparation: shape inference and graph folding (biases become initializers)
    quant_pre_process(str(fp32.onnx_path), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared))
    exclude = [n.name for n in graph.graph.node if not n.name.startswith(BACKBONE_SCOPE)]
    if len(exclude) == len(graph.graph.node):
        raise DeployError(f"no backbone nodes (named {BACKBONE_SCOPE}...) in the exported graph: nothing to quantize")
    backbone = {n.name for n in graph.graph.node} - set(exclude)
    unknown = [n for n in settings.float_nodes if n not in backbone]
    if unknown:
        raise DeployError(f"float_nodes names no backbone node of the exported graph: {unknown[:4]}")
    kept = ([stem_convolution(graph)] if settings.float_stem else []) + [
        n for n in settings.float_nodes if not (settings.float_stem and n == stem_convolution(graph))
    ]
    reader = _Reader(calibration_batches(detector, calibration, settings.calibration_images))
    if reader.count == 0:
        raise ValueError("no calibration images were found")
    quantized = tmp / f"{tag}_int8.onnx"
    # onnxruntime's histogram calibrators print() their progress; a library must not write to the caller's
    # stdout (the CLI's --json output, a worker's line protocol), so it goes to this module's debug log
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        _quantize_static(prepared, quantized, reader, settings, exclude + kept)
    if chatter.getvalue():
        logger.debug("onnxruntime calibration: %s", chatter.getvalue().strip())
    return fp32, onnx.load(str(quantized)), set(exclude), kept, reader.count


def _quantize_static(prepared: Path, quantized: Path, reader: Any, settings: QuantizeSettings, exclude: list) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared),
        str(quantized),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=settings.per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=settings.reduce_range,
        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[settings.calibration_method]),
        nodes_to_exclude=exclude,
        # one batch per collect_data call (see _Reader); symmetric activation ranges around 0 if asked
        extra_options={"CalibStridedMinMax": 1, "ActivationSymmetric": settings.symmetric_activations},
    )


def export_onnx_int8(
    source: Union[CRDDetector, PathLike],
    path: PathLike,
    calibration: Any,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    reduce_range: bool = False,
    opset: int = 17,
    metadata_path: Optional[PathLike] = None,
    refit_head: bool = True,
    float_stem: bool = True,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    per_channel: bool = True,
    symmetric_activations: bool = False,
    float_nodes: Sequence[str] = (),
) -> ExportResult:
    """Export a fitted detector (object or model file) to ONNX with an int8 backbone calibrated on ``calibration``.

    Args:
        source: a fitted CRDDetector or a detector model file (the file itself is not changed).
        path: the .onnx file to write (metadata next to it, as ``export_onnx`` does).
        calibration: defect-free images (a folder, files, a tensor batch...: what ``CRDDetector.fit`` takes),
            normally the training images.
        calibration_images: how many of them calibrate the activation ranges (the first ones).
        reduce_range: 7-bit weights, for processors without VNNI (see the module docstring).
        opset: ONNX opset of the float32 export (QDQ needs >= 13).
        metadata_path: where the metadata JSON goes (default ``path`` + ".json").
        refit_head: refit the head's statistics on the int8 backbone's features of ALL ``calibration`` images
            (see the module docstring); False keeps the source's head, fitted on float32 features.
        float_stem: keep the backbone's first convolution (the one reading the images) in float32 (see the
            module docstring); False quantizes it too.
        calibration_method: how activation ranges are set from the calibration images: "percentile" (the
            99.999th percentile of |activation|, the default; see the module docstring), "minmax" (their
            extremes) or "entropy" (onnxruntime's KL-divergence thresholds).
        per_channel: one weight scale per output channel (True) or per tensor (False).
        symmetric_activations: activation ranges symmetric around 0 (zero point 128) instead of [min, max].
        float_nodes: names of further backbone nodes of the exported graph kept float32 (DeployError if one
            is not a backbone node).
    """
    if isinstance(float_nodes, str):
        raise TypeError(f"float_nodes must be a sequence of node names, got the string {float_nodes!r}")
    settings = QuantizeSettings(
        calibration_images=calibration_images,
        reduce_range=reduce_range,
        float_stem=float_stem,
        calibration_method=calibration_method,
        per_channel=per_channel,
        symmetric_activations=symmetric_activations,
        float_nodes=tuple(float_nodes),
        opset=opset,
    )
    settings.check()
    if not isinstance(refit_head, bool):
        raise TypeError(f"refit_head must be True or False, got {refit_head!r}")
    out = Path(path)
    meta_path = Path(metadata_path) if metadata_path is not None else metadata_path_for(out)
    paths = path_inputs([source]) + path_inputs(calibration)
    # before any work: the graph and its sidecar may replace neither the model nor a calibration image
    check_outputs(files=[out, meta_path], inputs=paths)
    provenance: dict[str, Any] = {}
    if isinstance(source, CRDDetector):
        detector = source
    else:
        p = Path(source)
        detector = CRDDetector.load(p)
        provenance = {"source": str(p), "source_sha256": sha256_bytes(p.read_bytes())}
    if not detector.is_fitted:
        raise RuntimeError("the detector is not fitted yet: nothing to export")
    head_note = "the model's own, fitted on float32 backbone features"
    with tempfile.TemporaryDirectory(prefix="crd_int8_") as tmp:
        fp32, model, head_nodes, kept, count = _quantized(detector, Path(tmp), "source", calibration, settings)
        if refit_head:
            refitted, reservoir, n_refit = refit_on_graph(detector, model, head_nodes, calibration)
            # the training score statistics are computed below on the int8 graph itself, not in torch
            refitted.set_train_score_stats(None)
            first = backbone_signature(model, head_nodes)
            fp32, model, refit_nodes, _, count = _quantized(refitted, Path(tmp), "refit", calibration, settings)
            # calibrated ranges and weights of the backbone do not depend on the head: the same int8 backbone
            if backbone_signature(model, refit_nodes) != first:
                raise DeployError("the refitted export quantized the backbone differently from the first one")
            data = model.SerializeToString()
            train_stats = graph_score_statistics(data, reservoir.items, detector.batch_size)
            head_note = f"refitted on the int8 backbone's features of {n_refit} calibration images"
        else:
            data = model.SerializeToString()
    meta = dict(fp32.metadata)
    meta.update(provenance)
    if refit_head:
        meta["train_score_stats"] = train_stats
    meta.update(
        {
            "precision": "int8",
            "quantization": {
                "format": "QDQ",
                "weights": "int8 per " + ("channel" if per_channel else "tensor"),
                "activations": "uint8" + (" symmetric" if symmetric_activations else ""),
                "method": CALIBRATION_METHODS[calibration_method],
                "calibration_images": count,
                "reduce_range": bool(reduce_range),
                "quantized": "backbone convolutions"
                + (" but the first" if float_stem else "")
                + (f" and {len(kept) - int(float_stem)} other kept nodes" if len(kept) > int(float_stem) else "")
                + "; head and anomaly map float32",
                "float_backbone_nodes": kept,
                "head": head_note,
                "refit_images": n_refit if refit_head else 0,
            },
            "onnx_sha256": sha256_bytes(data),
        }
    )
    return write_export(data, meta, out, meta_path)  # sealed and written as one commit


__all__ = [
    "export_onnx_int8",
    "calibration_batches",
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_CALIBRATION_METHOD",
    "CALIBRATION_METHODS",
]
