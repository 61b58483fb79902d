"""Torch modules of the inference pipeline: feature maps -> CRD head -> anomaly map, exportable as one.

* ``head``: :class:`CRDHead`, feature maps -> patch score map;
* ``local_head``: :class:`LocalCRDHead`, the same for the position-aware (local) CRD model;
* ``anomaly_map``: :class:`AnomalyMapper`, patch scores -> blurred map at the input resolution;
* ``inference``: :class:`InferenceModel`, normalised images -> image scores, anomaly maps, patch maps;
* ``head_file``, ``local_head_file``: the heads' storage forms for small deploy files (``DeployHead``,
  ``LocalDeployHead``), in float16 or reduced rank.
"""

from .anomaly_map import AnomalyMapper
from .head import CRDHead
from .inference import InferenceModel
from .local_head import LocalCRDHead

__all__ = ["AnomalyMapper", "CRDHead", "InferenceModel", "LocalCRDHead"]
