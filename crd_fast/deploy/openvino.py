"""OpenVINO: export a model to OpenVINO IR and run it with ``OpenVinoDetector`` (optional extra ``openvino``).

    from crd_fast.deploy.openvino import export_openvino, OpenVinoDetector
    export_openvino("model.crd", "model.xml")      # model.xml + model.bin + model.xml.json (metadata)
    OpenVinoDetector("model.xml").predict("test/")  # DetectionResult, as CRDDetector.predict returns

The IR is converted from the verified ONNX export (``export_onnx``) and saved with float32 weights
(``compress_to_fp16=False``). OpenVINO runs a CPU model in bf16 by default on processors with AVX512-BF16
or AMX, which moves image scores by up to about 1e-3; ``OpenVinoDetector`` therefore asks for f32
inference (``INFERENCE_PRECISION_HINT``) unless ``inference_precision`` says otherwise. Only numpy, PIL and
openvino are imported at run time, as for the ONNX runtime.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from ..io.atomic import default_file_mode
from ..io.commit import commit_moves, hold, recover_folder, release
from ..io.safety import TEMP_PREFIX, check_outputs
from .head_files import ExportSource
from .metadata import (
    DIGEST_FIELD,
    DeployError,
    PathLike,
    check_expected,
    check_metadata_digest,
    check_metadata_fields,
    metadata_digest,
    metadata_path_for,
    sha256_bytes,
)
from .runtime import OnnxDetector, check_threads

FORMAT_NAME = "crd-fast-openvino"
FORMAT_VERSION = 1


def _ov():
    try:
        import openvino as ov
    except ImportError as exc:
        raise ImportError("OpenVINO export and inference need openvino: pip install 'crd-fast[openvino]'") from exc
    return ov


#: The IR runtime-info key holding the metadata digest (crd_fast/deploy/metadata.py).
RT_INFO_DIGEST = "crd_fast_metadata_sha256"


def export_openvino(source: ExportSource, path: PathLike, **onnx_options: Any) -> dict[str, Any]:
    """Write ``path`` (.xml), its .bin weights and ``path``.json metadata as one commit; returns the metadata.

    ``source`` and ``onnx_options`` (head_only, precision, rank, opset, verify) are those of ``export_onnx``. The
    metadata's digest is stamped into the IR (runtime info ``crd_fast_metadata_sha256``) before its hash is taken.
    """
    from .export import export_onnx

    ov = _ov()
    xml = Path(path)
    if xml.suffix != ".xml":
        raise ValueError(f"an OpenVINO model path must end in .xml, got {str(path)!r}")
    targets = [xml.with_suffix(".bin"), xml, metadata_path_for(xml)]  # the .bin first, the metadata last
    # before any work: none of the three files may replace an input, a device or a folder
    plan = check_outputs(files=targets, inputs=[source] if isinstance(source, (str, os.PathLike)) else [])
    folder = plan.real(xml).parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=TEMP_PREFIX + "ov-") as tmp:
        held = hold(tmp)  # kept from clean-up by other runs while in use
        try:
            onnx = export_onnx(source, Path(tmp) / "model.onnx", **onnx_options)
            model = ov.convert_model(str(onnx.onnx_path))
            meta = {k: v for k, v in onnx.metadata.items() if k not in ("onnx_sha256", DIGEST_FIELD)}
            meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, openvino_version=ov.get_version())
            digest = metadata_digest(meta)
            model.set_rt_info(digest, RT_INFO_DIGEST)
            staged = Path(tmp) / xml.name
            ov.save_model(model, str(staged), compress_to_fp16=False)  # keep float32 weights
            bin_staged = staged.with_suffix(".bin")
            meta.update(
                {
                    DIGEST_FIELD: digest,
                    "xml_sha256": sha256_bytes(staged.read_bytes()),
                    "bin_sha256": sha256_bytes(bin_staged.read_bytes()),
                }
            )
            meta_staged = Path(tmp) / "meta.json"
            meta_staged.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
            for staged_file in (bin_staged, staged, meta_staged):
                with open(staged_file, "rb+") as fh:
                    os.chmod(staged_file, default_file_mode())
                    os.fsync(fh.fileno())
            # one commit: a kill at any point leaves the old three files or the new three (crd_fast/io/commit.py)
            commit_moves(folder, list(zip((bin_staged, staged, meta_staged), (plan.real(t) for t in targets))))
        finally:
            release(held)
    return meta


def read_openvino_metadata(xml_path: PathLike, metadata_path: Optional[PathLike] = None) -> dict[str, Any]:
    """The metadata of an OpenVINO export, after checking the .xml and .bin bytes against it."""
    xml = Path(xml_path)
    meta_p = Path(metadata_path) if metadata_path is not None else metadata_path_for(xml)
    recover_folder(xml.parent)  # an export killed after its commit point is completed first
    for p, what in (
        (xml, "OpenVINO model file"),
        (xml.with_suffix(".bin"), "OpenVINO weights file"),
        (meta_p, "metadata file (written next to the model by export_openvino)"),
    ):
        if not p.is_file():
            raise DeployError(f"{p}: no such {what}")
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeployError(f"{meta_p}: metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        found = meta if isinstance(meta, dict) else {}
        raise DeployError(
            f"{meta_p}: not a crd_fast OpenVINO metadata file (format {found.get('format')!r}, version "
            f"{found.get('format_version')!r}; expected {FORMAT_NAME!r} version {FORMAT_VERSION})"
        )
    for p, key in ((xml, "xml_sha256"), (xml.with_suffix(".bin"), "bin_sha256")):
        if sha256_bytes(p.read_bytes()) != meta.get(key):
            raise DeployError(
                f"{p}: does not match its metadata {meta_p.name} (SHA-256 differs): modified, truncated, "
                "or the metadata belongs to another export"
            )
    for key in ("inputs", "outputs", "head_only"):
        if key not in meta:
            raise DeployError(f"{meta_p}: metadata field {key!r} is missing")
    check_metadata_fields(meta, meta_p)
    check_metadata_digest(meta, meta_p, None)  # the IR's stamp is compared once the detector has read it
    return meta


class _Port:
    def __init__(self, name: str, shape: list) -> None:
        self.name, self.shape = name, shape


class _Session:
    """The few onnxruntime session methods ``OnnxDetector`` uses, over an OpenVINO compiled model."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    @staticmethod
    def _port(port: Any) -> _Port:
        dims = [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]
        return _Port(port.get_any_name(), dims)

    def get_inputs(self) -> list[_Port]:
        return [self._port(p) for p in self.compiled.inputs]

    def get_outputs(self) -> list[_Port]:
        return [self._port(p) for p in self.compiled.outputs]

    def run(self, _names: Any, feeds: dict) -> list:
        results = self.request.infer(feeds)
        return [results[p].copy() for p in self.compiled.outputs]


class OpenVinoDetector(OnnxDetector):
    """An OpenVINO IR export run by OpenVINO, with the predict API of ``OnnxDetector`` / ``CRDDetector``.

    Args:
        path: the .xml written by ``export_openvino`` (its .bin and .xml.json beside it).
        device: OpenVINO device (default "CPU").
        inference_precision: OpenVINO's INFERENCE_PRECISION_HINT; "f32" (default) keeps scores equal to
            PyTorch's within float32 rounding; None leaves OpenVINO's choice (bf16 on some CPUs), "f16"/"bf16" ask
            for less precision.
        batch_size, threads, **expected: as for ``OnnxDetector``.
    """

    def __init__(
        self,
        path: PathLike,
        metadata_path: Optional[PathLike] = None,
        device: str = "CPU",
        inference_precision: Optional[str] = "f32",
        batch_size: Optional[int] = None,
        threads: Optional[int] = None,
        **expected: Any,
    ) -> None:
        from .imaging import NumpyPreprocess

        ov = _ov()
        self.path = os.fspath(path)
        meta = read_openvino_metadata(path, metadata_path)
        check_expected(meta, expected, path)
        self.metadata: dict[str, Any] = meta
        config: dict[str, Any] = {}
        if inference_precision is not None:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = check_threads(threads)
        core = ov.Core()
        try:
            graph = core.read_model(self.path)
            stamped = graph.get_rt_info(RT_INFO_DIGEST).astype(str) if graph.has_rt_info(RT_INFO_DIGEST) else None
            compiled = core.compile_model(graph, device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own messages
            raise DeployError(
                f"{self.path}: OpenVINO cannot load this model on {device} "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
            ) from exc
        check_metadata_digest(meta, metadata_path or metadata_path_for(path), stamped)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: "f32", "bf16", "f16"
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.session = _Session(compiled)
        self._check_signature()
        self.head_only = bool(meta["head_only"])
        self.config: dict[str, Any] = dict(meta.get("config") or {})
        self.threshold: Optional[float] = meta.get("threshold")
        self.pixel_threshold: Optional[float] = meta.get("pixel_threshold")
        self.train_score_stats: Optional[dict[str, float]] = meta.get("train_score_stats")
        self.batch_size = int(batch_size or self.config.get("batch_size") or 8)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.preprocess = None
        if not self.head_only:
            pre = meta.get("preprocess") or {}
            self.preprocess = NumpyPreprocess(int(pre["resize"]), int(pre["crop"]), pre["mean"], pre["std"])

    def __repr__(self) -> str:
        what = "head only" if self.head_only else "whole detector"
        return f"OpenVinoDetector({self.path!r}, {what}, precision {self.inference_precision})"


__all__: Sequence[str] = ("export_openvino", "OpenVinoDetector", "read_openvino_metadata")
