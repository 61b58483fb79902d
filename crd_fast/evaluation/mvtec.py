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
import torch
from tqdm.auto import tqdm

from ..core.embedding import embed_patches, patch_matrix
from ..data.datasets import MVTecAD
from ..data.images import Images, iter_images
from ..detector.detector import CRDDetector
from ..features.preprocess import load_image
from ..metrics import scores as M
from ..metrics.pixels import pixel_f1
from ..scorers.nn import NNScorer
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
NN_COLUMNS = (
    ("nn.image_auroc", "NN img AUROC", "{:.3f}"),
    ("nn.pixel_auroc", "NN px AUROC", "{:.3f}"),
    ("crd_head_ms_per_image", "CRD head ms/img", "{:.2f}"),
    ("nn.head_ms_per_image", "NN head ms/img", "{:.2f}"),
)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_nn(
    detector: CRDDetector,
    train_images: Sequence[Any],
    test_images: Sequence[Any],
    labels: Any,
    masks: Optional[np.ndarray] = None,
    subsample: Optional[float] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``test_images`` with exact 1-NN on the fitted ``detector``'s own patch features.

    Builds an :class:`~crd_fast.scorers.nn.NNScorer` memory bank from ``train_images`` (``subsample``: fraction kept),
    then for every test batch runs the backbone once and times both heads from the feature maps: the
    detector's CRD head, and embedding + nearest-neighbour search. Returns the NN figures (image/pixel
    AUROC, AUPRO, head ms per image, bank size) and the CRD head's ms per image on the same features.
    """
    nn_scorer = NNScorer(subsample=subsample, seed=detector.seed)
    with tqdm(
        total=len(train_images), desc="NN memory bank", unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for _, x in detector.iter_batches(list(train_images)):
            nn_scorer.partial_fit(patch_matrix(detector.embed(x)))
            bar.update(x.shape[0])
    model = detector.inference_model()
    device = detector.device
    crd_s = nn_s = 0.0
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    n = 0
    with tqdm(total=len(test_images), desc="NN scoring", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for _, x in detector.iter_batches(list(test_images)):
            with torch.inference_mode():
                feats = detector.extract_features(x)
                _sync(device)
                t0 = time.perf_counter()
                model.head(feats)
                _sync(device)
                t1 = time.perf_counter()
                emb = embed_patches(feats, detector.embedding, detector.target_dim)
                dist = torch.as_tensor(nn_scorer.score(patch_matrix(emb)))
                _sync(device)
                t2 = time.perf_counter()
                b, _, h, w = emb.shape
                patch_maps = dist.reshape(b, h, w).float().to(device)
                maps.append(detector.mapper(patch_maps).cpu().numpy())
                scores.append(patch_maps.flatten(1).amax(dim=1).double().cpu().numpy())
            crd_s += t1 - t0
            nn_s += t2 - t1
            n += b
            bar.update(b)
    nn_metrics, _ = score_metrics(labels, np.concatenate(scores), masks, np.concatenate(maps))
    return {
        "nn": {
            "image_auroc": nn_metrics["image_auroc"],
            "pixel_auroc": nn_metrics["pixel_auroc"],
            "aupro": nn_metrics["aupro"],
            "head_ms_per_image": 1e3 * nn_s / max(n, 1),
            "bank_patches": nn_scorer.n_samples,
            "bank_mb": nn_scorer.nbytes / 2**20,
        },
        "crd_head_ms_per_image": 1e3 * crd_s / max(n, 1),
    }


def _listed(images: Images) -> list[Any]:
    return [img if path is None else path for path, img in iter_images(images)]


def evaluate_dataset(
    detector: CRDDetector,
    train: Any,
    test: Any,
    name: str,
    compare_nn_baseline: bool = False,
    nn_subsample: Optional[float] = None,
    n_examples: int = 4,
    fpr_limit: float = 0.3,
    progress: bool = True,
    pixel_q: Optional[float] = None,
) -> CategoryEvaluation:
    """Fit ``detector`` on ``train`` (defect-free images) and evaluate it on the labelled ``test`` set.

    ``train``: anything the detector can fit on (a folder, a list of paths, a data set). ``test``: a data
    set with ``image_paths``, ``labels``, ``defect_types`` and ``masks(preprocess)`` (``MVTecAD``,
    ``FolderDataset``). Any earlier fit of ``detector`` is discarded.
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
    if compare_nn_baseline:
        train_items = train.image_paths if hasattr(train, "image_paths") else train
        if isinstance(train_items, str) or not hasattr(train_items, "__len__"):
            train_items = [img for _, img in iter_images(train_items)]
        extra = compare_nn(detector, train_items, paths, labels, masks, nn_subsample, progress)
        metrics["nn"] = dict(extra["nn"])
        metrics["crd_head_ms_per_image"] = extra["crd_head_ms_per_image"]
        extra = {
            "nn": {k: extra["nn"][k] for k in ("image_auroc", "pixel_auroc", "head_ms_per_image")},
            "crd_head_ms_per_image": extra["crd_head_ms_per_image"],
        }
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
    for key, _, _ in TABLE_COLUMNS + NN_COLUMNS:
        values = [v for v in (_lookup(e.metrics, key) for e in evals) if v is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def format_table(evals: Sequence[CategoryEvaluation]) -> str:
    """A plain-text table, one row per category (and the mean when there are several)."""
    columns = list(TABLE_COLUMNS)
    if any("nn" in e.metrics for e in evals):
        columns += list(NN_COLUMNS)
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
