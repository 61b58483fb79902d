"""CRDDetector: fit on defect-free images, then score new images and locate their defects.

    from crd_fast import CRDDetector
    det = CRDDetector(backbone="wide_resnet50_2", weights="imagenet").fit("train/good")
    result = det.predict("test/")        # image_scores (N,), anomaly_maps (N, crop, crop), ...
    det.save("model.crd"); det = CRDDetector.load("model.crd")

Fitting streams the images in batches into ``CRDScorer.partial_fit`` (spatial "global": only the d x d
float64 sums are kept) or ``LocalCRDScorer.partial_fit`` (spatial "local": per-position means and
fixed-size sketches), so memory does not grow with the number of training images. With lam_rel="auto"
or spatial="auto" (the defaults) the fit also holds out a few images and chooses both without labels
(crd_fast/detector/selection.py). A small fixed-size random sample of training inputs (``SCORE_SAMPLE``
images) is kept to compute the training score statistics used for score normalisation.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..choices import DEFAULT_LAM_GRID, DEFAULT_LAM_REL, LAM_AUTO
from ..core.embedding import embed_patches, embedding_dim, patch_grids, patch_matrix
from ..core.precision import PrecisionChoice, resolve_precision
from ..core.stats import PatchStatistics
from ..data.images import Images, count_images, iter_images
from ..features.backbone import (
    BackboneWeightsError,
    FeatureExtractor,
    module_state_sha256,
    same_weights,
    weights_identity,
)
from ..features.preprocess import Preprocess, load_image
from ..features.timm_backbone import TimmFeatures, is_timm
from ..io.images import decode_reservation
from ..io.model_file import ModelFileError, PathLike, read_model_file, require, write_model_file
from ..models.anomaly_map import AnomalyMapper
from ..models.head import CRDHead
from ..models.inference import InferenceModel
from ..postprocess.pixels import pixel_f1_threshold, pixel_quantile_threshold
from ..postprocess.results import DetectionResult
from ..postprocess.thresholds import check_threshold, f1_threshold, quantile_threshold
from ..scorers.crd import CRDScorer
from . import selection as sel
from .config import OPTIONS, RUNTIME_OPTIONS, DetectorConfig
from .model_checks import check_detector_metadata
from .reservoir import Reservoir

if TYPE_CHECKING:
    from ..scorers.local import LocalCRDScorer

logger = logging.getLogger(__name__)

MODEL_KIND = "crd_detector"
#: Training inputs kept (reservoir sample, fixed size) to compute the training score statistics.
SCORE_SAMPLE = 32
#: What a model file written before compute precisions existed was fitted and scored with.
LEGACY_PRECISION = "fp32"
#: Model files written before the spatial option: the global CRD (their lam_rel is a number).
LEGACY_SPATIAL = {"spatial": "global", "local_rank": 32, "local_shrinkage": 0.5}
__all__ = ["CRDDetector", "MODEL_KIND", "OPTIONS", "RUNTIME_OPTIONS", "SCORE_SAMPLE", "score_statistics"]


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r} (use 'cpu', 'cuda', 'cuda:N' or 'auto')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
    return dev


def _jsonable(value: Any) -> Any:
    """Tuples to lists etc., so requested and stored option values compare as JSON does."""
    return json.loads(json.dumps(value))


class CRDDetector:
    """Anomaly detector: backbone features + CRD patch scores + anomaly maps.

    Takes the options of :class:`~crd_fast.detector.config.DetectorConfig`, which describes each (by keyword,
    or positionally in its field order: backbone, weights, layers, embedding, lam_rel, ...), e.g.
    ``CRDDetector(backbone="resnet18", weights="random")``. ``CRDDetector.from_config(config)`` builds one from
    a DetectorConfig; ``options`` gives it back.

    ``images`` anywhere below: a folder, an image file, a list of paths/PIL images/arrays, a tensor batch
    (B, 3, H, W) of RGB values in [0, 1], or a data set object (see ``crd_fast.data.images``).
    """

    def __init__(self, *args: Any, **options: Any) -> None:
        self._init(DetectorConfig(*args, **options))

    @classmethod
    def from_config(cls, config: DetectorConfig) -> "CRDDetector":
        """The detector ``config`` describes (unfitted)."""
        if not isinstance(config, DetectorConfig):
            raise TypeError(f"config must be a DetectorConfig, got {type(config).__name__}")
        det = cls.__new__(cls)
        det._init(config)
        return det

    def _init(self, config: DetectorConfig) -> None:
        self._options = config
        self.device = _resolve_device(config.device)
        self.precision_choice: PrecisionChoice = resolve_precision(config.precision, self.device)
        self.mapper = AnomalyMapper((config.crop, config.crop), config.blur_sigma)  # checks blur_sigma against crop
        lam_rel = DEFAULT_LAM_REL if config.lam_rel == LAM_AUTO else config.lam_rel  # "auto": chosen by the fit
        self.scorer = CRDScorer(lam_rel, config.center, config.rank)
        self.local_scorer: Optional["LocalCRDScorer"] = None
        # "timm:<name>" is built here (crd_fast.features.timm_backbone) and used as a module; its name stays.
        backbone = config.backbone
        if is_timm(backbone):
            backbone = TimmFeatures(backbone, config.layers, config.weights, config.seed)
            if config.layers is None:  # its default stages, read from the model: the options record them
                config = self._options = config.replace(layers=backbone.layers)
        self.extractor = FeatureExtractor(backbone, config.layers, config.weights, config.seed).to(self.device)
        self.extractor.set_precision(self.precision_choice)  # fit and predict alike
        # The backbone's own normalisation: ImageNet's for torchvision, the model's for timm or a user module.
        self.preprocess = Preprocess(config.resize, config.crop, self.extractor.mean, self.extractor.std)
        self.weights_identity = weights_identity(config.weights, config.seed, config.backbone_name)
        if isinstance(config.backbone, nn.Module):  # a user module is identified by its weights
            self.weights_identity["state_sha256"] = module_state_sha256(config.backbone)
        shapes = self.extractor.feature_shapes(config.crop)
        self.layer_channels = [s[0] for s in shapes]
        self.patch_grid = (shapes[0][1], shapes[0][2])
        self.dim = embedding_dim(self.layer_channels, config.embedding, config.target_dim)
        if config.spatial != "global":  # a local_rank the sketch cannot hold fails here, not after a long fit
            self._new_local_scorer(DEFAULT_LAM_REL)
        self.threshold: Optional[float] = None
        self.pixel_threshold: Optional[float] = None
        self.reset()

    # ---- options ----------------------------------------------------------------------------------
    @property
    def options(self) -> DetectorConfig:
        """The detector's options now: lam_rel, center, rank, local_rank and local_shrinkage as the scorers have
        them now; lam_rel and spatial stay "auto" where they were asked so (the choice: ``lam_rel``,
        ``spatial_choice``)."""
        s = self.scorer
        changes: dict[str, Any] = dict(center=s.center, rank=s.rank)
        if self._options.lam_rel != LAM_AUTO:
            changes["lam_rel"] = self.lam_rel
        if self.local_scorer is not None:
            changes.update(local_rank=self.local_scorer.rank, local_shrinkage=self.local_scorer.shrinkage)
        return self._options.replace(**changes)

    @property
    def config(self) -> dict[str, Any]:
        """Every constructor option, JSON-serialisable (as ``options`` has them)."""
        return self.options.to_dict()

    @property
    def spatial_choice(self) -> Optional[str]:
        """The spatial model in use: "global" or "local" (None before a fit with spatial="auto")."""
        return self._spatial_choice

    @property
    def lam_rel(self) -> Optional[float]:
        """The lam_rel in use (after lam_rel="auto": the chosen one; None before that fit)."""
        if not self._lam_resolved:
            return None
        return self.local_scorer.lam_rel if self._spatial_choice == "local" else self.scorer.lam_rel

    @property
    def selection_pending(self) -> bool:
        """Whether the next fit chooses lam_rel and/or the spatial model (an "auto" option not decided yet)."""
        return not self._lam_resolved or self._spatial_choice is None

    backbone_name = property(lambda self: self._options.backbone_name, doc="The backbone's name (custom:<class>).")
    weights = property(lambda self: self._options.weights, doc="'imagenet', 'random', a file path, or None.")
    layers = property(lambda self: self._options.layers, doc="The backbone layers used.")
    embedding = property(lambda self: self._options.embedding, doc="'concat' or 'patchcore'.")
    seed = property(lambda self: self._options.seed, doc="Seed of random weights and of the score sample.")
    blur_sigma = property(lambda self: self._options.blur_sigma, doc="Anomaly map blur, in pixels.")
    target_dim = property(lambda self: self._options.target_dim, doc="d of the patchcore embedding.")

    @property
    def batch_size(self) -> int:
        """Images per forward pass (may be changed: it is a run-time option)."""
        return self._options.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._options = self._options.replace(batch_size=value)

    # ---- fitting state ----------------------------------------------------------------------------
    def reset(self) -> "CRDDetector":
        """Forget what was fitted (statistics, image count, score sample, the label-free choices); keeps the
        options and threshold."""
        s, old_local = self.scorer, self.local_scorer
        auto_lam = self._options.lam_rel == LAM_AUTO
        self.scorer = CRDScorer(DEFAULT_LAM_REL if auto_lam else s.lam_rel, s.center, s.rank)
        self._lam_resolved = not auto_lam
        self._spatial_choice: Optional[str] = None if self._options.spatial == "auto" else self._options.spatial
        self.local_scorer = None
        if self._spatial_choice == "local":
            keep = old_local if old_local is not None and not auto_lam else None
            self.local_scorer = self._new_local_scorer(
                s.lam_rel if keep is None else keep.lam_rel,
                *(() if keep is None else (keep.shrinkage, keep.rank)),
            )
        #: The label-free choice's record (grid, curves per family, choice, held-out count, reason, seconds);
        #: None when nothing was chosen (explicit lam_rel and spatial).
        self.selection: Optional[dict[str, Any]] = None
        self._fit_version = 0
        self.n_images = 0
        self._reservoir: Reservoir[torch.Tensor] = Reservoir(SCORE_SAMPLE, self.seed)
        self._train_stats: Optional[dict[str, float]] = None
        self._stats_stale = False
        self._model: Optional[InferenceModel] = None
        self._model_projection: Any = None
        return self

    def _new_local_scorer(
        self, lam_rel: float, shrinkage: Optional[float] = None, rank: Optional[int] = None
    ) -> "LocalCRDScorer":
        from ..scorers.local import LocalCRDScorer

        return LocalCRDScorer(
            lam_rel,
            shrinkage=self._options.local_shrinkage if shrinkage is None else shrinkage,
            rank=self._options.local_rank if rank is None else rank,
        )

    @property
    def reservoir(self) -> Reservoir[torch.Tensor]:
        """The random sample (at most SCORE_SAMPLE) of normalised training inputs, on the CPU."""
        return self._reservoir

    def install_fit(self, scorer: CRDScorer, n_images: int, reservoir: Reservoir[torch.Tensor]) -> "CRDDetector":
        """Take over a fit computed elsewhere (e.g. combined over processes by ``fit_distributed``).

        ``scorer``: fitted on this detector's patch embeddings (its d); ``n_images``: how many images that
        fit saw; ``reservoir``: the sample of their normalised inputs. The training score statistics are
        recomputed from the sample on demand; the threshold is kept.
        """
        if not scorer.is_fitted or scorer.dim != self.dim:
            raise ValueError(f"the scorer must be fitted on d={self.dim} features, got {scorer!r}")
        if self._spatial_choice != "global" or not self._lam_resolved:
            raise ValueError(
                "install_fit takes a global CRD fit with a known lam_rel; this detector's spatial model is "
                f"{self._spatial_choice or 'not chosen yet'} and lam_rel is {self.lam_rel or 'not chosen yet'}"
            )
        if reservoir.capacity != SCORE_SAMPLE:
            raise ValueError(f"the reservoir must hold up to {SCORE_SAMPLE} inputs, not {reservoir.capacity}")
        self.scorer = scorer
        self.n_images = int(n_images)
        self._reservoir = reservoir
        self._stats_stale = True
        return self

    def install_local_fit(
        self, local_scorer: "LocalCRDScorer", n_images: int, reservoir: Reservoir[torch.Tensor]
    ) -> "CRDDetector":
        """``install_fit`` for the local model: a LocalCRDScorer fitted elsewhere on this detector's patch grids."""
        if self._spatial_choice != "local" or not self._lam_resolved:
            raise ValueError(f"install_local_fit needs a detector with the local model, not {self._spatial_choice}")
        positions = self.patch_grid[0] * self.patch_grid[1]
        if not local_scorer.is_fitted or (local_scorer.positions, local_scorer.dim) != (positions, self.dim):
            raise ValueError(
                f"the local scorer must be fitted on ({positions}, d={self.dim}) grids, got {local_scorer!r}"
            )
        if reservoir.capacity != SCORE_SAMPLE:
            raise ValueError(f"the reservoir must hold up to {SCORE_SAMPLE} inputs, not {reservoir.capacity}")
        self.local_scorer = local_scorer
        self.scorer.replace_statistics(self._pooled_copy())
        self.n_images = int(n_images)
        self._reservoir = reservoir
        self._fit_version += 1
        self._stats_stale = True
        return self

    @property
    def uses_random_weights(self) -> bool:
        return self.weights_identity.get("kind") == "random"

    @property
    def weights_description(self) -> str:
        """One line for reports saying where the backbone weights came from."""
        ident = self.weights_identity
        if ident["kind"] == "random":
            return (
                f"{self.backbone_name} with seeded RANDOM weights (seed {ident['seed']}): "
                "scores do not show the accuracy of real (ImageNet) weights"
            )
        if ident["kind"] == "file":
            return f"{self.backbone_name} with weights from {ident['file']} (sha256 {ident['sha256'][:12]}...)"
        if ident["kind"] == "imagenet" and "package" in ident:
            return f"{self.backbone_name} with ImageNet weights from the {ident['package']} {ident['version']} package"
        if ident["kind"] == "imagenet":
            return f"{self.backbone_name} with torchvision ImageNet weights ({ident['name']})"
        return f"{self.backbone_name} (user module)"

    @property
    def is_fitted(self) -> bool:
        if self._spatial_choice == "local":
            return self.local_scorer is not None and self.local_scorer.is_fitted
        return self.scorer.is_fitted

    # ---- images -> batches ----------------------------------------------------------------------
    def _prepare(self, index: int, path: Optional[str], image: Any) -> torch.Tensor:
        if isinstance(image, str):
            with decode_reservation(image):  # parallel decoding bounded by memory (crd_fast.io.limits)
                return self.preprocess(load_image(image))
        try:
            return self.preprocess(image)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"image {index}: {exc}") from exc

    def iter_batches(self, images: Images) -> Iterator[tuple[list[Optional[str]], torch.Tensor]]:
        """Yield (paths, normalised (B, 3, crop, crop) float32 batch on the detector's device).

        Files are decoded and preprocessed in a small thread pool, one batch ahead of the consumer.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            for start in range(0, images.shape[0], self.batch_size):
                chunk = images[start : start + self.batch_size].to(self.device)
                # contiguous: the same picture must give the same scores whatever the caller's memory layout
                yield [None] * chunk.shape[0], self.preprocess.batch(chunk).contiguous()
            return
        workers = max(1, min(self.batch_size, os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = None
            batch: list[tuple[int, Optional[str], Any]] = []

            def submit(items: list) -> tuple[list[Optional[str]], list]:
                return [p for _, p, _ in items], [pool.submit(self._prepare, *it) for it in items]

            def collect(job: tuple[list[Optional[str]], list]) -> tuple[list[Optional[str]], torch.Tensor]:
                paths, futures = job
                return paths, torch.stack([f.result() for f in futures]).to(self.device)

            for index, (path, image) in enumerate(iter_images(images)):
                batch.append((index, path, image))
                if len(batch) == self.batch_size:
                    job = submit(batch)
                    batch = []
                    if pending is not None:
                        yield collect(pending)
                    pending = job
            if batch:
                job = submit(batch)
                if pending is not None:
                    yield collect(pending)
                pending = job
            if pending is not None:
                yield collect(pending)

    def _progress(self, images: Images, desc: str, progress: bool) -> tqdm:
        try:
            total = count_images(images)
        except (OSError, ValueError):
            total = None
        return tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)

    # ---- features -------------------------------------------------------------------------------
    def extract_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of a normalised (B, 3, H, W) batch, one per layer (inference mode)."""
        with torch.inference_mode():
            return self.extractor(x.to(self.device))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, d, h, w) of a normalised batch (the scorer's input, as in ``reference``)."""
        with torch.inference_mode():
            return embed_patches(self.extract_features(x), self.embedding, self.target_dim)

    # ---- fitting ----------------------------------------------------------------------------------
    def fit(self, images: Images, progress: bool = True) -> "CRDDetector":
        """Fit on defect-free images, discarding any earlier fit and threshold.

        With lam_rel="auto" and/or spatial="auto" (the defaults), a few images are held out, pseudo-defects
        are painted on them, and the candidate (spatial model, lam_rel) that ranks and locates them best is
        chosen (crd_fast/detector/selection.py); the model is then fitted on all images with that choice.
        The record is ``selection``. Fewer than 20 images: no selection (spatial "global", lam_rel 0.01).
        """
        self.threshold = None
        self.pixel_threshold = None
        return self.reset().partial_fit(images, progress)

    def partial_fit(self, images: Images, progress: bool = True) -> "CRDDetector":
        """Add defect-free images to the fit (online updates); from empty this is exactly ``fit``.

        On a fitted detector this updates the statistics of the model in use (the global statistics, or the
        local model's per-position means and sketches) and keeps the chosen spatial model and lam_rel: the
        label-free selection is not run again (``fit`` on all images chooses afresh).
        """
        if not self.is_fitted and self.selection_pending:
            return self._fit_selecting(images, progress)
        local = self._spatial_choice == "local"
        added = 0
        with self._progress(images, "fit", progress) as bar:
            for _, x in self.iter_batches(images):
                if local:
                    self.local_scorer.partial_fit(patch_grids(self.embed(x)))
                else:
                    patches = patch_matrix(self.embed(x))
                    self._add_patches(patches)
                self._remember(x)
                added += x.shape[0]
                bar.update(x.shape[0])
        if added == 0:
            raise ValueError("no images to fit on")
        if local and self.local_scorer.is_fitted:  # the pooled global CRD of the same images follows the local model
            self.scorer.replace_statistics(self._pooled_copy())
        self.n_images += added
        self._fit_version += 1
        self._stats_stale = True
        logger.info(
            "added %d images to the fit (%d in all, %d patches, d=%d)",
            added,
            self.n_images,
            self.scorer.n_samples,
            self.dim,
        )
        return self

    def _add_patches(self, patches: torch.Tensor) -> None:
        # Keep the float64 statistics on the features' device, so a GPU fit does not ship every
        # batch of patches to the CPU: seed them with two rows, move them, then add the rest.
        if not self.scorer.is_fitted:
            self.scorer.partial_fit(patches[:2])
            patches = patches[2:]
        stats = self.scorer.statistics
        if stats.device != patches.device:
            stats.to(patches.device)
        if patches.shape[0]:
            self.scorer.partial_fit(patches)

    def _pooled_copy(self) -> PatchStatistics:
        s = self.local_scorer.pooled_statistics
        return PatchStatistics.from_tensors(s.count, s.mean, s.scatter)

    def _fit_selecting(self, images: Images, progress: bool) -> "CRDDetector":
        """Fit from empty while choosing what the options leave open (lam_rel and/or spatial "auto")."""
        started = time.perf_counter()
        opts = self._options
        families = sel.SPATIAL_FAMILIES if self._spatial_choice is None else (self._spatial_choice,)
        lam_grid = tuple(DEFAULT_LAM_GRID) if not self._lam_resolved else (float(self.scorer.lam_rel),)
        try:
            count = count_images(images)
        except (OSError, ValueError):
            count = None
        if count is not None and count < sel.MIN_IMAGES:  # too few to hold any out: the defaults, fitted as usual
            return self._fit_without_selection(images, progress, families, lam_grid, count, started)
        plan = sel.HeldOutPlan(count)
        # the local statistics are only gathered where the local family can still be chosen
        need_local = "local" in families and (families == ("local",) or count is None or count >= sel.MIN_IMAGES)
        factory = (lambda: self._new_local_scorer(lam_grid[0])) if need_local else None
        stats_device = self.device
        rest = sel.TrainingPart(self.dim, stats_device, factory)
        held = sel.TrainingPart(self.dim, stats_device, factory)
        held_inputs: list[torch.Tensor] = []
        held_grids: list[torch.Tensor] = []
        seen = 0
        with self._progress(images, "fit", progress) as bar:
            for _, x in self.iter_batches(images):
                grids = patch_grids(self.embed(x))
                hold = torch.tensor([plan.take(seen + i) for i in range(x.shape[0])], dtype=torch.bool)
                if bool(hold.any()):
                    idx = hold.nonzero()[:, 0].to(x.device)
                    held.add(grids[idx])
                    held_grids.append(grids[idx].float().cpu())
                    held_inputs.append(x[idx].detach().cpu())
                if not bool(hold.all()):
                    rest.add(grids[(~hold).nonzero()[:, 0].to(x.device)])
                self._remember(x)
                seen += x.shape[0]
                bar.update(x.shape[0])
        if seen == 0:
            raise ValueError("no images to fit on")
        watch = sel.Stopwatch()
        asked = {"lam_rel": opts.lam_rel, "spatial": opts.spatial}
        reason = sel.fallback_reason(seen, plan.held)
        if reason is not None:
            spatial, lam = sel.default_choice(families, lam_grid)
            record = sel.fallback_record(asked, spatial, lam, seen, reason, plan.held)
        else:
            with watch:
                held_set = self._held_out_set(torch.cat(held_inputs), torch.cat(held_grids))
            pseudo_seconds = watch.seconds
            with watch:
                local_model = rest.local.model() if "local" in families else None
            local_model_seconds = watch.seconds - pseudo_seconds
            with watch:
                spatial, lam, families_record, about = sel.evaluate_candidates(
                    held_set,
                    lam_grid,
                    rest.pooled() if "global" in families else None,
                    opts.center,
                    local_model,
                )
            record = {
                "asked": asked,
                "grid": list(lam_grid),
                "families": families_record,
                "choice": {"spatial": spatial, "lam_rel": lam},
                "held_out": plan.held,
                "n_images": seen,
                "pseudo_defects": sorted(set(held_set.kinds)),
                "criterion": sel.CRITERION,
                "pseudo_strength": sel.PSEUDO_STRENGTH,
                "evidence": about["evidence"],
                "paired_likelihood": about["paired_likelihood"],
                "reason": about["reason"],
                "pseudo_defect_seconds": round(pseudo_seconds, 4),
                "local_model_seconds": round(local_model_seconds, 4),
            }
        with watch:
            self._install_choice(rest.merge(held), spatial, lam)
        record["seconds"] = round(watch.seconds, 4)
        record["fit_seconds"] = round(time.perf_counter() - started, 4)
        self.selection = record
        self.n_images += seen
        self._fit_version += 1
        self._stats_stale = True
        logger.info(
            "fitted on %d images; spatial %s, lam_rel %g (%s; %.2f s of %.2f s)",
            seen,
            spatial,
            lam,
            record["reason"],
            record["seconds"],
            record["fit_seconds"],
        )
        return self

    def _fit_without_selection(
        self,
        images: Images,
        progress: bool,
        families: Sequence[str],
        lam_grid: Sequence[float],
        count: int,
        started: float,
    ) -> "CRDDetector":
        """The fit of too few images for a selection: the default choice, streamed like explicit options."""
        self.settle_without_selection(count)
        try:
            self.partial_fit(images, progress)
        except BaseException:
            self.reset()  # still unfitted: the next fit chooses afresh
            raise
        self.selection["fit_seconds"] = round(time.perf_counter() - started, 4)
        return self

    def settle_without_selection(self, n_images: int) -> dict[str, Any]:
        """Decide what lam_rel/spatial "auto" leave open as a fit of ``n_images`` (< 20) images does, without a
        selection: spatial "global" where open, lam_rel DEFAULT_LAM_REL where open; records why (``selection``)
        and returns the record. For an unfitted detector (e.g. before a distributed fit of few images)."""
        if self.is_fitted:
            raise RuntimeError("the detector is fitted: its spatial model and lam_rel are already chosen")
        families = sel.SPATIAL_FAMILIES if self._spatial_choice is None else (self._spatial_choice,)
        lam_grid = tuple(DEFAULT_LAM_GRID) if not self._lam_resolved else (float(self.scorer.lam_rel),)
        spatial, lam = sel.default_choice(families, lam_grid)
        reason = sel.fallback_reason(n_images, 0) or f"{n_images} training images: no selection asked here"
        self.scorer.lam_rel = lam
        if spatial == "local":
            if self.local_scorer is None:
                self.local_scorer = self._new_local_scorer(lam)
            self.local_scorer.lam_rel = lam
        self._spatial_choice, self._lam_resolved = spatial, True
        asked = {"lam_rel": self._options.lam_rel, "spatial": self._options.spatial}
        self.selection = sel.fallback_record(asked, spatial, lam, n_images, reason)
        return self.selection

    def _held_out_set(self, clean_inputs: torch.Tensor, clean_grids: torch.Tensor) -> sel.HeldOutSet:
        """The held-out images' clean grids and pseudo-defect grids (one pseudo-defect each, embedded here)."""
        pseudo_x, masks, kinds = sel.pseudo_defect_batch(
            clean_inputs, self.preprocess.mean, self.preprocess.std, self.seed
        )
        pseudo = [
            patch_grids(self.embed(pseudo_x[i : i + self.batch_size].to(self.device))).float().cpu()
            for i in range(0, pseudo_x.shape[0], self.batch_size)
        ]
        return sel.HeldOutSet.build(clean_grids, torch.cat(pseudo), masks, kinds, tuple(self.patch_grid))

    def _install_choice(self, part: sel.TrainingPart, spatial: str, lam_rel: float) -> None:
        """Use the fit of all images (``part``) with the chosen spatial model and lam_rel."""
        s = self.scorer
        self.scorer = CRDScorer.from_statistics(part.pooled(), lam_rel, s.center, s.rank)
        self.local_scorer = None
        if spatial == "local":
            self.local_scorer = part.local
            self.local_scorer.lam_rel = lam_rel
        self._spatial_choice = spatial
        self._lam_resolved = True

    def _remember(self, x: torch.Tensor) -> None:
        """Offer a batch to the training-score sample; only the inputs it keeps are copied to the CPU."""
        self._reservoir.extend_lazily(x.shape[0], lambda kept: {p: x[p].detach().to("cpu", copy=True) for p in kept})

    @property
    def train_score_stats(self) -> Optional[dict[str, float]]:
        """Statistics of training image scores (n, mean, std, min, max, q50, q90, q95, q99), from a
        random sample of up to SCORE_SAMPLE training images; None before fitting."""
        if self._stats_stale and len(self._reservoir):
            self._train_stats = score_statistics(self._image_scores(torch.stack(self._reservoir.items)))
            self._stats_stale = False
        return self._train_stats

    def set_train_score_stats(self, stats: Optional[dict[str, float]]) -> None:
        """Use ``stats`` as the training score statistics until the next fit (e.g. those of a quantized export's
        own scores, crd_fast.deploy.quantize); None: none (exports then record none)."""
        if stats is not None and (
            not isinstance(stats, dict) or not all(isinstance(v, (int, float)) for v in stats.values())
        ):
            raise ValueError(f"training score statistics must be a dict of numbers or None, got {stats!r}")
        self._train_stats = None if stats is None else dict(stats)
        self._stats_stale = False

    def _image_scores(self, x: torch.Tensor) -> np.ndarray:
        model = self.inference_model()
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                out.append(model(x[start : start + self.batch_size].to(self.device))[0].double().cpu())
        return torch.cat(out).numpy()

    # ---- inference --------------------------------------------------------------------------------
    def inference_model(self) -> InferenceModel:
        """The fitted extractor + head + mapper as one module, on the detector's device, in eval mode.

        The head is a CRDHead (spatial "global") or a LocalCRDHead ("local"). Rebuilt whenever the model
        changes (new data, lam_rel, center or rank; for local: lam_rel, shrinkage or rank).
        """
        if not self.is_fitted:
            raise RuntimeError("this CRDDetector is not fitted yet: call fit(images) first")
        if self._spatial_choice == "local":
            ls = self.local_scorer
            key = ("local", self._fit_version, ls.n_images, ls.lam_rel, ls.shrinkage, ls.rank)
            if self._model is None or self._model_projection != key:
                from ..models.local_head import LocalCRDHead

                head = LocalCRDHead.from_model(
                    ls.model(), ls.lam_rel, self.embedding, self.target_dim, self.layer_channels
                )
                self._model = InferenceModel(self.extractor, head, self.mapper).to(self.device).eval()
                self._model_projection = key
            return self._model
        proj = self.scorer.projection
        if self._model is None or self._model_projection is not proj:
            head = CRDHead.from_scorer(self.scorer, self.embedding, self.target_dim, self.layer_channels)
            self._model = InferenceModel(self.extractor, head, self.mapper).to(self.device).eval()
            self._model_projection = proj
        return self._model

    def predict(self, images: Images, progress: bool = True) -> DetectionResult:
        """Image scores, anomaly maps and patch maps for ``images`` (labels once a threshold is set)."""
        model = self.inference_model()
        scores, amaps, pmaps, paths = [], [], [], []
        with self._progress(images, "predict", progress) as bar:
            for batch_paths, x in self.iter_batches(images):
                with torch.inference_mode():
                    s, a, p = model(x)
                scores.append(s.double().cpu().numpy())
                amaps.append(a.float().cpu().numpy())
                pmaps.append(p.float().cpu().numpy())
                paths += batch_paths
                bar.update(x.shape[0])
        result = DetectionResult.from_batches(scores, amaps, pmaps, paths)
        result.apply_threshold(self.threshold, self.train_score_stats)
        return result.apply_pixel_threshold(self.pixel_threshold)

    # ---- thresholds -------------------------------------------------------------------------------
    def set_threshold(self, value: Optional[float]) -> None:
        """Set the image-score threshold (score >= threshold is defective); None removes it."""
        self.threshold = check_threshold(value)

    def calibrate(self, normal_images: Images, q: float = 0.99, progress: bool = True) -> float:
        """Set the threshold to the ``q`` quantile of held-out defect-free images' scores; returns it."""
        threshold = quantile_threshold(self.predict(normal_images, progress).image_scores, q)
        self.set_threshold(threshold)
        logger.info("image threshold %.6g (quantile %g of held-out normal image scores)", threshold, q)
        return threshold

    def calibrate_labelled(self, images: Images, labels: Any, progress: bool = True) -> float:
        """Set the F1-optimal threshold on labelled validation images (1 = defective); returns it."""
        threshold = f1_threshold(self.predict(images, progress).image_scores, labels)
        self.set_threshold(threshold)
        logger.info("image threshold %.6g (F1-optimal on labelled images)", threshold)
        return threshold

    def set_pixel_threshold(self, value: Optional[float]) -> None:
        """Set the anomaly-map threshold of ``pred_masks`` (value >= threshold is a defect pixel); None removes it."""
        self.pixel_threshold = check_threshold(value)

    def calibrate_pixels(self, normal_images: Images, q: float = 0.999, progress: bool = True) -> float:
        """Set the pixel threshold to the ``q`` quantile of the anomaly-map values of held-out defect-free
        images; returns it."""
        threshold = pixel_quantile_threshold(self.predict(normal_images, progress).anomaly_maps, q)
        self.set_pixel_threshold(threshold)
        logger.info("pixel threshold %.6g (quantile %g of held-out normal anomaly-map values)", threshold, q)
        return threshold

    def calibrate_pixels_labelled(self, images: Images, masks: Sequence[Any], progress: bool = True) -> float:
        """Set the pixel-F1-optimal pixel threshold on images with ground-truth masks; returns it.

        ``masks``: one per image, as the image was given (PIL image or (H, W) array, nonzero = defect);
        they are resized and cropped like the images (``preprocess.mask``).
        """
        maps = self.predict(images, progress).anomaly_maps
        if len(masks) != maps.shape[0]:
            raise ValueError(f"{len(masks)} masks for {maps.shape[0]} images")
        truth = np.stack([self.preprocess.mask(m) for m in masks])
        threshold = pixel_f1_threshold(maps, truth)
        self.set_pixel_threshold(threshold)
        logger.info("pixel threshold %.6g (pixel-F1-optimal on labelled masks)", threshold)
        return threshold

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write one model file (safetensors + JSON metadata, atomically) with everything predict needs."""
        if not self.is_fitted:
            raise RuntimeError("this CRDDetector is not fitted yet: nothing to save")
        tensors, crd_fields = self.scorer.state(prefix="crd.")
        fields = {
            "config": self.config,
            "weights_identity": self.weights_identity,
            "backbone": self.backbone_name,
            "layers": list(self.layers),
            "layer_channels": self.layer_channels,
            "patch_grid": list(self.patch_grid),
            "resize": self.preprocess.resize,
            "crop": self.preprocess.crop,
            "embedding": self.embedding,
            "d": self.dim,
            "lam": crd_fields["lam"],
            "lam_rel": crd_fields["lam_rel"],
            "n_images": self.n_images,
            "n_patches": crd_fields["n"],
            "train_score_stats": self.train_score_stats,
            "threshold": self.threshold,
            "crd": crd_fields,
        }
        if self.pixel_threshold is not None:  # only then: a file without one keeps the earlier content exactly
            fields["pixel_threshold"] = self.pixel_threshold
        if self._spatial_choice == "local":  # the local model under "local."; "crd." is the pooled global CRD
            local_tensors, local_fields = self.local_scorer.state(prefix="local.")
            tensors.update(local_tensors)
            fields["local"] = local_fields
            fields["lam_rel"] = self.local_scorer.lam_rel
            if "lam" in local_fields:
                fields["lam"] = local_fields["lam"]
        if self.selection is not None or self._spatial_choice == "local":  # a global fit with explicit options
            fields["spatial_choice"] = self._spatial_choice  # keeps the earlier content exactly
            fields["selection"] = self.selection
        write_model_file(path, MODEL_KIND, tensors, fields)
        logger.info(
            "saved model to %s (%s, d=%d, %d training images)", path, self.backbone_name, self.dim, self.n_images
        )

    @classmethod
    def load(cls, path: PathLike, device: Optional[Union[str, torch.device]] = None, **expected: Any) -> "CRDDetector":
        """Read a model file written by ``save``.

        ``expected``: constructor options the caller requires (e.g. backbone="resnet18", layers=(...));
        any that differ from the file raise ModelFileError. ``device`` and ``batch_size`` are run-time
        choices and simply override the stored ones (``device=None``: the stored device, or "cpu" when
        the model was fitted on CUDA and this machine has none). ``weights`` is compared by identity (a file by its
        SHA-256), so a moved weights file can be passed at its new path. A model fitted with a user
        module needs ``backbone=<that module>``.
        """
        tensors, meta = read_model_file(path, MODEL_KIND)
        stored = meta.get("config")
        if isinstance(stored, dict):  # files from before compute precisions / before the spatial option
            stored = {"precision": LEGACY_PRECISION, **LEGACY_SPATIAL, **stored}
        require(isinstance(stored, dict) and set(OPTIONS) <= set(stored), path, "metadata has no complete 'config'")
        meta = {**meta, "config": stored}
        check_detector_metadata(meta, path)
        unknown = sorted(set(expected) - set(OPTIONS))
        if unknown:
            raise TypeError(f"unknown detector option(s) {unknown}; known: {', '.join(OPTIONS)}")
        ident = meta.get("weights_identity") or {}
        init = dict(stored)
        for key, want in expected.items():
            init[key] = _requested_option(path, key, want, stored, ident)
        if device is not None:
            init["device"] = device
        elif str(init["device"]) not in ("cpu", "auto") and not torch.cuda.is_available():
            init["device"] = "cpu"  # a run-time choice of the machine that fitted it, not part of the model
        if str(init["backbone"]).startswith("custom:") and not isinstance(init["backbone"], nn.Module):
            raise ModelFileError(
                f"{path}: the model was made with a user backbone module ({stored['backbone']}); "
                "pass it as CRDDetector.load(path, backbone=module)"
            )
        moved_weights_file = ident.get("kind") == "file" and "weights" not in expected
        if moved_weights_file and os.path.isfile(init["weights"]):
            found = weights_identity(init["weights"], stored["seed"], stored["backbone"])
            require(
                found.get("sha256") == ident.get("sha256"),
                path,
                f"weights file {init['weights']} changed since the model was saved (SHA-256 differs)",
            )
        try:
            det = cls(**init)
        except BackboneWeightsError as exc:
            if moved_weights_file:
                raise BackboneWeightsError(
                    f"{exc} (the model {path} was fitted with this weights file; "
                    "pass CRDDetector.load(path, weights=<its new path>) if it moved)"
                ) from exc
            raise
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: cannot rebuild the detector from its stored config: {exc}") from exc
        require(  # weights known by their bytes (a file, HED's, a package's) must still be those bytes
            "sha256" not in ident or same_weights(det.weights_identity, ident),
            path,
            f"the backbone weights changed since the model was saved: {ident} then, {det.weights_identity} now",
        )
        require(
            list(det.patch_grid) == meta.get("patch_grid"),
            path,
            f"crop {det.preprocess.crop} gives a {det.patch_grid} patch grid, the file says {meta.get('patch_grid')}",
        )
        require(
            det.layer_channels == meta.get("layer_channels"),
            path,
            f"the backbone gives layer channels {det.layer_channels}, the file says {meta.get('layer_channels')}",
        )
        det.scorer = CRDScorer.from_state(tensors, meta.get("crd") or {}, path, prefix="crd.")
        require(
            det.scorer.dim == det.dim, path, f"the stored scorer has d={det.scorer.dim}, the features have d={det.dim}"
        )
        det._load_spatial(tensors, meta, path)
        det.n_images = int(meta.get("n_images", 0))
        det._train_stats = meta.get("train_score_stats")
        threshold = meta.get("threshold")
        require(
            threshold is None or isinstance(threshold, (int, float)), path, f"threshold {threshold!r} is not a number"
        )
        det.set_threshold(threshold)
        det.set_pixel_threshold(meta.get("pixel_threshold"))  # absent before pixel thresholds; checked on load
        logger.info("loaded model %s (%s, d=%d, device %s)", path, det.backbone_name, det.dim, det.device)
        return det

    def _load_spatial(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: PathLike) -> None:
        """The spatial model, the lam_rel in use and the selection record of a model file (after ``crd.``)."""
        spatial = meta.get("spatial_choice", "global")  # absent: a global fit with explicit options, or older
        asked = meta["config"].get("spatial", "global")
        require(spatial in ("global", "local"), path, f"spatial_choice {spatial!r} is not 'global' or 'local'")
        require(
            asked in ("auto", spatial), path, f"the file's spatial model is {spatial!r} but its config asks {asked!r}"
        )
        record = meta.get("selection")
        require(record is None or isinstance(record, dict), path, "selection is not an object or null")
        local_names = sorted(name for name in tensors if name.startswith("local."))
        if spatial == "global":
            require(not local_names, path, f"a global model file holds local-model tensors {local_names[:3]}")
            self.local_scorer = None
        else:
            require(
                bool(local_names) and isinstance(meta.get("local"), dict),
                path,
                "the file says spatial 'local' but holds no local model (tensors 'local.*' and field 'local')",
            )
            from ..scorers.local import LocalCRDScorer

            try:
                local = LocalCRDScorer.from_state(tensors, meta["local"], path, prefix="local.")
            except ModelFileError:
                raise
            except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
                raise ModelFileError(f"{path}: the local model is unusable: {exc}") from exc
            positions = self.patch_grid[0] * self.patch_grid[1]
            require(
                local.positions == positions and local.dim == self.dim,
                path,
                f"the local model has {local.positions} positions and d={local.dim}; the features give "
                f"{positions} positions ({self.patch_grid[0]}x{self.patch_grid[1]}) and d={self.dim}",
            )
            self.local_scorer = local
        self._spatial_choice = spatial
        self._lam_resolved = True
        self.selection = record
        self._fit_version += 1

    def __repr__(self) -> str:
        state = f"fitted on {self.n_images} images" if self.is_fitted else "unfitted"
        return (
            f"CRDDetector(backbone={self.backbone_name!r}, weights={self.weights!r}, layers={self.layers}, "
            f"embedding={self.embedding!r}, d={self.dim}; {state})"
        )


# The constructor takes DetectorConfig's fields: show them in help() and IDEs rather than (*args, **options).
CRDDetector.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *inspect.signature(DetectorConfig).parameters.values(),
    ]
)


def _requested_option(path: PathLike, key: str, want: Any, stored: dict[str, Any], ident: dict[str, Any]) -> Any:
    """The value to build with when ``load`` is asked for option ``key`` = ``want``.

    Run-time options take the requested value; the others must describe the stored model: a user
    module by its class name, weights by their identity (a file by its SHA-256, wherever it is now),
    the seed only where it made the weights, everything else by its validated value.
    """
    if key in RUNTIME_OPTIONS or (key == "seed" and ident.get("kind") != "random"):
        return want
    if key == "backbone" and isinstance(want, nn.Module):
        if f"custom:{type(want).__name__}" != stored[key]:
            raise ModelFileError(
                f"{path}: the model was made with backbone {stored[key]!r}, not a {type(want).__name__} module"
            )
        want_hash, stored_hash = module_state_sha256(want), ident.get("state_sha256")
        if stored_hash is not None and want_hash != stored_hash:  # files before this check have no hash
            raise ModelFileError(
                f"{path}: the {type(want).__name__} module passed has other weights than "
                f"the one the model was fitted with (state-dict SHA-256 {want_hash[:12]}... != "
                f"{stored_hash[:12]}...); scores would change"
            )
        return want
    if key == "weights":
        asked = weights_identity(DetectorConfig.check(key, want), stored["seed"], stored["backbone"])
        if not same_weights(asked, ident):
            raise ModelFileError(
                f"{path}: the model was made with weights {ident}, but weights={want!r} ({asked}) was requested"
            )
        return want
    if _jsonable(DetectorConfig.check(key, want)) != _jsonable(DetectorConfig.check(key, stored[key])):
        raise ModelFileError(f"{path}: the model was made with {key}={stored[key]!r}, but {key}={want!r} was requested")
    return want


def score_statistics(scores: np.ndarray) -> dict[str, float]:
    """The training score statistics of image ``scores`` (n, mean, std, min, max, q50, q90, q95, q99)."""
    scores = np.asarray(scores, dtype=np.float64)
    q = np.quantile(scores, [0.5, 0.9, 0.95, 0.99])
    return {
        "n": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
        "q50": float(q[0]),
        "q90": float(q[1]),
        "q95": float(q[2]),
        "q99": float(q[3]),
    }
