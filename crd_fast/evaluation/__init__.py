"""Measuring a detector: metrics (torch-free) and evaluation on labelled data sets.

* ``metrics``: image AUROC, pixel AUROC, AUPRO, F1-max (numpy and scikit-learn only);
* ``mvtec``: fit per category on the good training images, score the test images, measure.
"""

_LAZY = {"evaluate_dataset", "evaluate_mvtec", "format_table", "mean_metrics"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    # ``mvtec`` needs torch; ``metrics`` must import without it (the report writer uses it).
    if name in _LAZY:
        from . import mvtec

        return getattr(mvtec, name)
    raise AttributeError(f"module 'crd_fast.evaluation' has no attribute {name!r}")
