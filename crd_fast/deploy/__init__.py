"""Deployment: ONNX export, an onnxruntime predictor without torch, and reduced-precision / rank-r heads.

    from crd_fast.deploy import export_onnx, OnnxDetector
    export_onnx("model.crd", "model.onnx")            # + model.onnx.json (metadata, SHA-256 of the ONNX bytes)
    OnnxDetector("model.onnx").predict("test/")       # numpy + PIL + onnxruntime only; no torch import

Importing this package imports no torch: the runtime names are loaded eagerly, the export and head-file tools
(which need torch; the head files' classes live beside the heads, in crd_fast/models) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .metadata import DeployError, metadata_path_for
from .runtime import OnnxDetector

_LAZY = {
    "export_onnx": "crd_fast.deploy.export",
    "ExportResult": "crd_fast.deploy.export",
    "DEFAULT_OPSET": "crd_fast.deploy.export",
    "check_default_domain": "crd_fast.deploy.export",
    "head_of": "crd_fast.deploy.export",
    "make_head_file": "crd_fast.deploy.head_files",
    "head_from": "crd_fast.deploy.head_files",
    "load_head_file": "crd_fast.deploy.head_files",
    "measure_error": "crd_fast.deploy.head_errors",
    "measure_local_error": "crd_fast.deploy.head_errors",
    "rank_for_error_bound": "crd_fast.deploy.head_errors",
    "DeployHead": "crd_fast.models.head_file",
    "variant_projection": "crd_fast.models.head_file",
    "PRECISIONS": "crd_fast.models.head_file",
    "LocalDeployHead": "crd_fast.models.local_head_file",
}

__all__ = ["OnnxDetector", "DeployError", "metadata_path_for", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
