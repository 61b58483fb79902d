"""Deployment: ONNX export, an onnxruntime predictor without torch, and reduced-precision / rank-r heads.

    from crd_fast.deploy import export_onnx, OnnxDetector
    export_onnx("model.crd", "model.onnx")            # + model.onnx.json (metadata, SHA-256 of the ONNX bytes)
    OnnxDetector("model.onnx").predict("test/")       # numpy + PIL + onnxruntime only; no torch import

Importing this package imports no torch: the runtime names are loaded eagerly, the export and precision
tools (which need torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .metadata import DeployError, metadata_path_for
from .runtime import OnnxDetector

_LAZY = {
    "export_onnx": "export",
    "ExportResult": "export",
    "DEFAULT_OPSET": "export",
    "check_default_domain": "export",
    "head_of": "export",
    "DeployHead": "precision",
    "make_head_file": "head_files",
    "head_from": "head_files",
    "load_head_file": "head_files",
    "measure_error": "precision",
    "variant_projection": "precision",
    "rank_for_error_bound": "precision",
    "PRECISIONS": "precision",
    "LocalDeployHead": "local_head_file",
    "measure_local_error": "local_head_file",
}

__all__ = ["OnnxDetector", "DeployError", "metadata_path_for", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
