"""The CRD math: running statistics of normal patches and the projection derived from them."""

from .projection import CRDProjection, crd_lambda, eigen_form, projection_matrix
from .stats import PatchStatistics

__all__ = ["PatchStatistics", "CRDProjection", "crd_lambda", "eigen_form", "projection_matrix"]
