"""Other scoring rules on the detector's own features, for comparison: exact 1-NN and PaDiM's per-position Gaussian.

Each baseline is fitted on the embeddings of the training images and scores the test images' embeddings; the
backbone runs once per test batch for all of them and for the detector's own head, so the comparison is of the
scoring rules alone, on the same features (docs/DESIGN.md "What fast means"):

* ``"nn"``: exact nearest-neighbour distance to every training patch (PatchCore's rule without a coreset,
  :class:`~crd_fast.scorers.NNScorer`);
* ``"padim"``: the Mahalanobis distance under a Gaussian per grid position (PaDiM's rule,
  :class:`~crd_fast.scorers.PaDiMScorer`); refused, with a note, where its d x d per-position covariances would
  not fit in memory.

A new baseline is one class with the three methods of :class:`Baseline`, added to ``BASELINES``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.embedding import patch_grids, patch_matrix
from ..detector.detector import CRDDetector
from ..metrics import scores as M
from ..scorers.nn import NNScorer
from ..scorers.padim import PaDiMScorer


class Baseline(Protocol):
    """A scoring rule fitted on training embeddings (B, d, h, w), scoring test embeddings to (B, h, w) patch maps."""

    def add(self, embeddings: torch.Tensor) -> None: ...

    def patch_maps(self, embeddings: torch.Tensor) -> torch.Tensor: ...

    def size(self) -> dict[str, Any]: ...


class NearestNeighbour:
    """Exact 1-NN distance to a bank of all (or a ``subsample`` of the) training patches."""

    label = "exact 1-NN"

    def __init__(self, seed: int, subsample: Optional[float] = None) -> None:
        self.scorer = NNScorer(subsample=subsample, seed=seed)

    def add(self, embeddings: torch.Tensor) -> None:
        self.scorer.partial_fit(patch_matrix(embeddings))

    def patch_maps(self, embeddings: torch.Tensor) -> torch.Tensor:
        b, _, h, w = embeddings.shape
        return torch.as_tensor(self.scorer.score(patch_matrix(embeddings))).reshape(b, h, w)

    def size(self) -> dict[str, Any]:
        return {"bank_patches": self.scorer.n_samples, "bank_mb": self.scorer.nbytes / 2**20}


class PaDiM:
    """PaDiM's rule: a Gaussian N(mu_p, C_p + 0.01 I) per grid position."""

    label = "PaDiM's rule"

    def __init__(self, seed: int, subsample: Optional[float] = None) -> None:
        self.scorer = PaDiMScorer()

    def add(self, embeddings: torch.Tensor) -> None:
        self.scorer.partial_fit(patch_grids(embeddings))

    def patch_maps(self, embeddings: torch.Tensor) -> torch.Tensor:
        b, _, h, w = embeddings.shape
        return torch.as_tensor(self.scorer.score(patch_grids(embeddings))).reshape(b, h, w)

    def size(self) -> dict[str, Any]:
        return {"model_mb": self.scorer.nbytes / 2**20}


#: Baseline name (the key of its figures in ``CategoryResult.extra``) -> class.
BASELINES: dict[str, Any] = {"nn": NearestNeighbour, "padim": PaDiM}


@dataclass
class BaselineRun:
    """What :func:`compare_baselines` measured: per baseline its figures (image/pixel AUROC, AUPRO, head ms per image,
    model size) and its image scores of the test images, the detector's own head time on the same features, and
    notes on baselines that could not run."""

    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_scores: dict[str, np.ndarray] = field(default_factory=dict)
    crd_head_ms_per_image: Optional[float] = None
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_baselines(
    detector: CRDDetector,
    train_images: Sequence[Any],
    test_images: Sequence[Any],
    labels: Any,
    masks: Optional[np.ndarray] = None,
    names: Sequence[str] = ("nn",),
    nn_subsample: Optional[float] = None,
    progress: bool = True,
) -> BaselineRun:
    """Fit the baselines ``names`` on the fitted ``detector``'s embeddings of ``train_images`` and score
    ``test_images`` with each, timing each head from the same feature maps (see the module docstring)."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {', '.join(BASELINES)}")
    run = BaselineRun()
    rules = {n: BASELINES[n](detector.seed, nn_subsample) for n in names}
    bar = tqdm(total=len(train_images), desc="baselines: fit", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for _, x in detector.iter_batches(list(train_images)):
            emb = detector.embed(x)
            for name in list(rules):
                try:
                    rules[name].add(emb)
                except MemoryError as exc:  # PaDiM's covariances at a large d: say so, compare the others
                    run.notes.append(f"{rules.pop(name).label} skipped: {exc}")
            bar.update(x.shape[0])
    model = detector.inference_model()
    device = detector.device
    seconds = {name: 0.0 for name in ["crd", *rules]}
    scores: dict[str, list[np.ndarray]] = {name: [] for name in rules}
    maps: dict[str, list[np.ndarray]] = {name: [] for name in rules}
    n = 0
    bar = tqdm(total=len(test_images), desc="baselines: score", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for _, x in detector.iter_batches(list(test_images)):
            with torch.inference_mode():
                feats = detector.extract_features(x)
                _sync(device)
                t0 = time.perf_counter()
                model.head(feats)
                _sync(device)
                seconds["crd"] += time.perf_counter() - t0
                for name, rule in rules.items():
                    t0 = time.perf_counter()
                    emb = detector.embed_maps(feats)
                    patch_maps = rule.patch_maps(emb).float().to(device)
                    _sync(device)
                    seconds[name] += time.perf_counter() - t0
                    maps[name].append(detector.mapper(patch_maps).cpu().numpy())
                    scores[name].append(patch_maps.flatten(1).amax(dim=1).double().cpu().numpy())
            n += x.shape[0]
            bar.update(x.shape[0])
    for name, rule in rules.items():
        image_scores = np.concatenate(scores[name])
        figures: dict[str, Any] = {"image_auroc": None, "pixel_auroc": None, "aupro": None}
        y = np.asarray(labels).astype(bool)
        if y.any() and not y.all():
            figures["image_auroc"] = M.image_auroc(y, image_scores)
        if masks is not None and np.asarray(masks).any():
            amaps = np.concatenate(maps[name])
            figures["pixel_auroc"] = M.pixel_auroc(masks, amaps)
            figures["aupro"] = M.aupro(masks, amaps)
        figures["head_ms_per_image"] = 1e3 * seconds[name] / max(n, 1)
        run.figures[name] = {**figures, **rule.size()}
        run.image_scores[name] = image_scores
    run.crd_head_ms_per_image = 1e3 * seconds["crd"] / max(n, 1)
    return run


__all__ = ["BASELINES", "Baseline", "BaselineRun", "NearestNeighbour", "PaDiM", "compare_baselines"]
