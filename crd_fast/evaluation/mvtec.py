"""Evaluate a detector on labelled data: fit on the good training images, score the test images, measure.

    from crd_fast import CRDDetector
    from crd_fast.evaluation import evaluate_mvtec, format_table
    det = CRDDetector(backbone="resnet18", weights="random")
    evals = evaluate_mvtec(det, "mvtec/", ["bottle"], compare_nn=True)
    print(format_table(evals))
    write_report("report/", [e.result for e in evals])      # crd_fast.report

Shared by ``crd-fast eval`` and ``crd-fast demo``. Each category is one :class:`CategoryEvaluation`: the
report's :class:`~crd_fast.report.CategoryResult` (labels, scores, maps, masks, a few display images,
timings and the nearest-neighbour comparison in ``extra``) plus the metrics as a dict.

``compare_nn`` scores the same test images with the exact nearest-neighbour baseline
(:class:`~crd_fast.scorers.nn.NNScorer`, PatchCore's rule without coreset) on the very same patch features and
the same anomaly-map upsampling and blur, so the two heads are compared like for like; both heads are
timed from the backbone's feature maps to the patch scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..data.datasets import MVTecAD
from ..data.images import Images, iter_images
from ..detector.detector import CRDDetector
from ..features.preprocess import load_image
from ..metrics import scores as M
from ..metrics.pixels import pixel_f1
from .baselines import compare_baselines
from .results import CategoryResult, example_indices

#: Columns of :func:`format_table` (key in the metrics dict, header, format).
TABLE_COLUMNS = (
    ("image_auroc", "image AUROC", "{:.3f}"),
    ("pixel_auroc", "pixel AUROC", "{:.3f}"),
    ("aupro", "AUPRO", "{:.3f}"),
    ("f1_max", "F1-max", "{:.3f}"),
    ("fit_seconds", "fit s", "{:.1f}"),
    ("ms_per_image", "ms/img", "{:.1f}"),
)
#: Columns of each other scoring rule measured on the same features (crd_fast/evaluation/baselines.py), by its key.
PEER_COLUMNS = {
    "nn": (
        ("nn.image_auroc", "NN img AUROC", "{:.3f}"),
        ("nn.pixel_auroc", "NN px AUROC", "{:.3f}"),
        ("nn.head_ms_per_image", "NN head ms/img", "{:.2f}"),
    ),
    "padim": (
        ("padim.image_auroc", "PaDiM img AUROC", "{:.3f}"),
        ("padim.pixel_auroc", "PaDiM px AUROC", "{:.3f}"),
        ("padim.head_ms_per_image", "PaDiM head ms/img", "{:.2f}"),
    ),
}
CRD_HEAD_COLUMN = ("crd_head_ms_per_image", "CRD head ms/img", "{:.2f}")
ALL_COLUMNS = TABLE_COLUMNS + (CRD_HEAD_COLUMN,) + tuple(c for cols in PEER_COLUMNS.values() for c in cols)


@dataclass
class CategoryEvaluation:
    """One evaluated category: the report input and its metrics (None where a metric is not defined)."""

    name: str
    result: CategoryResult
    metrics: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def score_metrics(
    labels: Any,
    scores: Any,
    masks: Optional[np.ndarray] = None,
    maps: Optional[np.ndarray] = None,
    fpr_limit: float = 0.3,
) -> tuple[dict[str, Any], list[str]]:
    """image AUROC, F1-max (and its threshold), pixel AUROC, AUPRO; None (with a note) where undefined.

    Image metrics need good and defective images; pixel metrics need maps and at least one defect pixel.
    """
    out: dict[str, Any] = {
        "image_auroc": None,
        "f1_max": None,
        "f1_threshold": None,
        "pixel_auroc": None,
        "aupro": None,
    }
    notes: list[str] = []
    y = np.asarray(labels).astype(bool)
    if not (y.any() and not y.all()):
        notes.append("image metrics need both good and defective test images")
        return out, notes
    have_pixels = masks is not None and maps is not None and bool(np.asarray(masks).any())
    if masks is not None and not have_pixels:
        notes.append("no pixel metrics: the ground-truth masks are empty")
    out.update(
        M.evaluate(y, scores, masks if have_pixels else None, maps if have_pixels else None, fpr_limit=fpr_limit)
    )
    return out, notes


def _listed(images: Images) -> list[Any]:
    return [img if path is None else path for path, img in iter_images(images)]


def evaluate_dataset(
    detector: CRDDetector,
    train: Any,
    test: Any,
    name: str,
    compare_nn_baseline: bool = False,
    nn_subsample: Optional[float] = None,
    baselines: Sequence[str] = (),
    n_examples: int = 4,
    fpr_limit: float = 0.3,
    progress: bool = True,
    pixel_q: Optional[float] = None,
) -> CategoryEvaluation:
    """Fit ``detector`` on ``train`` (defect-free images) and evaluate it on the labelled ``test`` set.

    ``train``: anything the detector can fit on (a folder, a list of paths, a data set). ``test``: a data
    set with ``image_paths``, ``labels``, ``defect_types`` and ``masks(preprocess)`` (``MVTecAD``,
    ``FolderDataset``). Any earlier fit of ``detector`` is discarded.
    ``baselines``: other scoring rules to measure on the detector's own features (crd_fast/evaluation/baselines.py:
    "nn", "padim"); ``compare_nn_baseline=True`` adds "nn".
    ``pixel_q``: also set a pixel threshold, the ``pixel_q`` quantile of the anomaly-map values of every
    fifth training image, held out of the fit; predicted masks are then scored by pixel F1 (``pixel_f1``).
    """
    holdout = None
    if pixel_q is not None:
        items = list(train.image_paths if hasattr(train, "image_paths") else _listed(train))
        if len(items) < 5:
            raise ValueError(f"pixel_q needs at least 5 training images (every fifth is held out), got {len(items)}")
        train, holdout = [x for i, x in enumerate(items) if i % 5 != 4], items[4::5]
    t0 = time.perf_counter()
    detector.fit(train, progress=progress)
    if holdout is not None:
        detector.calibrate_pixels(holdout, q=pixel_q, progress=progress)
    detector.inference_model()  # M_pre is computed lazily: count it as part of fitting, not of the first predict
    fit_seconds = time.perf_counter() - t0
    paths = list(test.image_paths)
    t0 = time.perf_counter()
    pred = detector.predict(paths, progress=progress)
    ms_per_image = 1e3 * (time.perf_counter() - t0) / len(paths)
    labels = np.asarray(test.labels)
    masks = test.masks(detector.preprocess)
    metrics, notes = score_metrics(labels, pred.image_scores, masks, pred.anomaly_maps, fpr_limit)
    metrics.update(fit_seconds=fit_seconds, ms_per_image=ms_per_image)
    if pred.pred_masks is not None and masks is not None and masks.any():
        metrics["pixel_f1"] = pixel_f1(pred.pred_masks, masks)
    extra: dict[str, Any] = {}
    peers = list(dict.fromkeys([*(["nn"] if compare_nn_baseline else []), *baselines]))
    peer_scores: dict[str, np.ndarray] = {}
    if peers:
        train_items = train.image_paths if hasattr(train, "image_paths") else train
        if isinstance(train_items, str) or not hasattr(train_items, "__len__"):
            train_items = [img for _, img in iter_images(train_items)]
        run = compare_baselines(detector, train_items, paths, labels, masks, peers, nn_subsample, progress)
        notes += run.notes
        for peer, figures in run.figures.items():
            metrics[peer] = dict(figures)
            extra[peer] = {k: figures[k] for k in ("image_auroc", "pixel_auroc", "head_ms_per_image")}
        metrics["crd_head_ms_per_image"] = extra["crd_head_ms_per_image"] = run.crd_head_ms_per_image
        peer_scores = run.image_scores
    # Display images only for the overlays the report shows (decoding every test image is wasted work).
    picks = sorted({i for group in example_indices(labels, pred.image_scores, n_examples).values() for i in group})
    images = {i: detector.preprocess.display(load_image(paths[i])) for i in picks}
    result = CategoryResult(
        name=name,
        labels=labels,
        image_scores=pred.image_scores,
        masks=masks,
        anomaly_maps=pred.anomaly_maps,
        images=images,
        paths=paths,
        defect_types=list(test.defect_types),
        fit_seconds=fit_seconds,
        ms_per_image=ms_per_image,
        extra=extra,
        pixel_threshold=getattr(detector, "pixel_threshold", None),
        selection=None if detector.selection is None else detector.selection.to_dict(),
        peer_scores=peer_scores or None,
    )
    return CategoryEvaluation(name, result, metrics, notes)


def evaluate_mvtec(
    detector: CRDDetector, root: Any, categories: Optional[Sequence[str]] = None, **kwargs: Any
) -> list[CategoryEvaluation]:
    """:func:`evaluate_dataset` for each MVTec AD category under ``root`` (all found when ``categories`` is None).

    One detector is refitted per category (its backbone is built once). ``kwargs`` go to ``evaluate_dataset``.
    """
    if not categories:
        categories = MVTecAD.categories(root)
        if not categories:
            raise FileNotFoundError(
                f"no MVTec AD categories under {str(root)!r} "
                "(expected ROOT/<category>/train/good and ROOT/<category>/test/<type>)"
            )
    out = []
    for category in categories:
        train, test = MVTecAD(root, category, "train"), MVTecAD(root, category, "test")
        out.append(evaluate_dataset(detector, train.image_paths, test, category, **kwargs))
    return out


def _lookup(metrics: dict[str, Any], key: str) -> Any:
    value: Any = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def mean_metrics(evals: Sequence[CategoryEvaluation]) -> dict[str, Any]:
    """The mean of every table column over the categories that have it (nested keys flattened with '.')."""
    out: dict[str, Any] = {}
    for key, _, _ in ALL_COLUMNS:
        values = [v for v in (_lookup(e.metrics, key) for e in evals) if v is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def format_table(evals: Sequence[CategoryEvaluation]) -> str:
    """A plain-text table, one row per category (and the mean when there are several)."""
    columns = list(TABLE_COLUMNS)
    peers = [p for p in PEER_COLUMNS if any(p in e.metrics for e in evals)]
    if peers:
        columns.append(CRD_HEAD_COLUMN)
    for peer in peers:
        columns += list(PEER_COLUMNS[peer])
    head = ["category"] + [h for _, h, _ in columns]

    def row(name: str, metrics: dict[str, Any], flat: bool = False) -> list[str]:
        cells = [name]
        for key, _, fmt in columns:
            v = metrics.get(key) if flat else _lookup(metrics, key)
            cells.append("-" if v is None else fmt.format(v))
        return cells

    rows = [row(e.name, e.metrics) for e in evals]
    if len(evals) > 1:
        rows.append(row("mean", mean_metrics(evals), flat=True))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [head] + rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(evals) > 1:
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
