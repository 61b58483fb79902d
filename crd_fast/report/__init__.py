"""Evaluation reports: one self-contained HTML page (metrics, curves, heatmap overlays) plus the same figures as JSON.

from crd_fast.report import CategoryResult, RunInfo, write_report
write_report("out/", [CategoryResult("cap", labels, scores, masks, maps, images)], RunInfo(settings, "random"))
"""

from ..evaluation.results import CategoryResult, example_indices
from .run_info import RunInfo
from .writer import RANDOM_WEIGHTS_WARNING, Report, category_figures, write_report

__all__ = [
    "CategoryResult",
    "RunInfo",
    "Report",
    "RANDOM_WEIGHTS_WARNING",
    "category_figures",
    "example_indices",
    "write_report",
]
