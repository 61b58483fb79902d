"""CRDDetector: fit on defect-free images, then score new images and locate their defects.

    from crd_fast import CRDDetector
    det = CRDDetector().fit("train/good")   # EfficientNet-Lite0 with its packaged ImageNet weights
    result = det.predict("test/")        # image_scores (N,), anomaly_maps (N, crop, crop), ...
    det.save("model.crd"); det = CRDDetector.load("model.crd")

The detector conducts: its options (crd_fast/detector/config.py), the image pipeline (batches.py), the backbone
and embedding, and a scoring model (crd_fast/scoring: the global or the position-aware CRD, or any registered
model) that it streams patch grids into, so memory does not grow with the number of training images. With
lam_rel="auto" or spatial="auto" (the defaults) a fit from empty also hands its stream to a
``LabelFreeSelector`` (crd_fast/selection), which holds out a few images and chooses both without labels. A small
fixed-size random sample of training inputs is kept for the training score statistics (score_sample.py); model
files are written and read by persistence.py.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from ..choices import DEFAULT_LAM_GRID, DEFAULT_LAM_REL, LAM_AUTO
from ..core.embedding import embed_patches, patch_grids
from ..core.precision import PrecisionChoice, resolve_precision
from ..data.images import Images
from ..io.model_file import PathLike
from ..models.anomaly_map import AnomalyMapper
from ..models.inference import InferenceModel
from ..postprocess.results import DetectionResult
from ..scoring.base import ScoringModel
from ..scoring.registry import AUTO, model_class
from ..selection.plan import MIN_IMAGES
from ..selection.record import SelectionRecord
from . import batches
from .calibration import ThresholdCalibration
from .config import OPTIONS, RUNTIME_OPTIONS, DetectorConfig
from .feature_pipeline import build_feature_pipeline, describe_weights
from .open_models import check_open_models, label_free_selector, open_models, settled_model
from .persistence import MODEL_KIND, load_detector, save_detector
from .reservoir import Reservoir
from .score_sample import SCORE_SAMPLE, TrainingScores, score_statistics

logger = logging.getLogger(__name__)

__all__ = ["CRDDetector", "MODEL_KIND", "OPTIONS", "RUNTIME_OPTIONS", "SCORE_SAMPLE", "score_statistics"]


class CRDDetector(ThresholdCalibration):
    """Anomaly detector: backbone features + a scoring model's patch scores + anomaly maps.

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
        self.device = batches.resolve_device(config.device)
        self.precision_choice: PrecisionChoice = resolve_precision(config.precision, self.device)
        self.mapper = AnomalyMapper((config.crop, config.crop), config.blur_sigma)  # checks blur_sigma against crop
        features = build_feature_pipeline(config, self.device, self.precision_choice)
        self._options = features.config
        self.extractor, self.preprocess, self.layout = features.extractor, features.preprocess, features.layout
        self.weights_identity, self.layer_channels = features.weights_identity, features.layer_channels
        self.patch_grid, self.dim = features.patch_grid, features.dim
        self.model: Optional[ScoringModel] = None
        check_open_models(self.options.to_dict())  # a model option the model cannot take (e.g. local_rank) fails here
        self.threshold: Optional[float] = None
        self.pixel_threshold: Optional[float] = None
        self.reset()

    # ---- options ----------------------------------------------------------------------------------
    @property
    def options(self) -> DetectorConfig:
        """The detector's options now: the scoring model's (lam_rel, center, rank, local_rank, ...) as it has them
        now; lam_rel and spatial stay "auto" where they were asked so (the choice: ``lam_rel``, ``spatial_choice``)."""
        changes = {} if self.model is None else {k: v for k, v in self.model.options().items() if k in OPTIONS}
        if self._options.lam_rel == LAM_AUTO:
            changes.pop("lam_rel", None)
        return self._options.replace(**changes)

    @property
    def config(self) -> dict[str, Any]:
        """Every constructor option, JSON-serialisable (as ``options`` has them)."""
        return self.options.to_dict()

    def _open_models(self) -> tuple[str, ...]:
        """The scoring models a fit may end with: the one asked, or every selectable one for spatial "auto"."""
        return open_models(self._options.spatial)

    def _model_options(self, lam_rel: float) -> dict[str, Any]:
        """The options a scoring model is created with: the detector's, at a numeric ``lam_rel``."""
        return {**self.options.to_dict(), "lam_rel": lam_rel}

    @property
    def spatial_choice(self) -> Optional[str]:
        """The scoring model in use ("global", "local", ...; None before a fit with spatial="auto")."""
        return None if self.model is None else self.model.name

    @property
    def lam_rel(self) -> Optional[float]:
        """The lam_rel in use (after lam_rel="auto": the chosen one; None before that fit, or for a model without
        one). Settable after fitting: scores change, no refit."""
        return None if self.model is None or not self._lam_resolved else self.model.lam_rel

    @lam_rel.setter
    def lam_rel(self, value: float) -> None:
        if self.model is None or not self._lam_resolved:
            raise RuntimeError("lam_rel can be set once the detector is fitted (or fixed by its options)")
        self.model.set_lam_rel(value)

    @property
    def selection_pending(self) -> bool:
        """Whether the next fit chooses lam_rel and/or the scoring model (an "auto" option not decided yet)."""
        return self.model is None or not self._lam_resolved

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
        """Forget what was fitted (the model's data, image count, score sample, the label-free choice); keeps the
        options (the scoring model's current ones too) and the thresholds."""
        auto_lam = self._options.lam_rel == LAM_AUTO
        if self._options.spatial == AUTO:
            self.model = None
        elif self.model is not None and self.model.name == self._options.spatial:
            self.model = self.model.fresh()
            if auto_lam and self.model.has_lam_rel:
                self.model.set_lam_rel(DEFAULT_LAM_REL)
        else:
            lam = DEFAULT_LAM_REL if auto_lam else self._options.lam_rel
            self.model = model_class(self._options.spatial).create(self._model_options(lam))
        # a model without lam_rel leaves nothing to choose
        self._lam_resolved = not auto_lam or (self.model is not None and not self.model.has_lam_rel)
        #: The label-free choice's record (crd_fast/selection/record.py); None when nothing was chosen.
        self.selection: Optional[SelectionRecord] = None
        self.n_images = 0
        self._scores = TrainingScores(self.seed)
        self._inference: Optional[InferenceModel] = None
        self._inference_for: Optional[tuple[Any, Any]] = None
        return self

    @property
    def reservoir(self) -> Reservoir[torch.Tensor]:
        """The random sample (at most SCORE_SAMPLE) of normalised training inputs, on the CPU."""
        return self._scores.reservoir

    def install_fit(self, model: ScoringModel, n_images: int, reservoir: Reservoir[torch.Tensor]) -> "CRDDetector":
        """Take over a fit computed elsewhere (e.g. combined over processes by ``fit_distributed``, or refitted on an
        int8 backbone's features).

        ``model``: the detector's scoring model (same name, lam_rel decided), fitted on this detector's patch grids;
        ``n_images``: how many images that fit saw; ``reservoir``: the sample of their normalised inputs. The
        training score statistics are recomputed from the sample on demand; the thresholds are kept.
        """
        if self.model is None or not self._lam_resolved or model.name != self.model.name:
            raise ValueError(
                f"install_fit takes a fit of this detector's scoring model ({self.spatial_choice or 'not chosen yet'}, "
                f"lam_rel {self.lam_rel or 'not chosen yet'}), got a {model.name!r} model"
            )
        positions = self.patch_grid[0] * self.patch_grid[1]
        if not model.is_fitted or model.dim != self.dim or model.positions not in (None, positions):
            raise ValueError(f"the model must be fitted on ({positions}, d={self.dim}) patch grids, got {model!r}")
        self._scores.take(reservoir)
        self.model = model
        self.n_images = int(n_images)
        return self

    def install_loaded(
        self,
        model: ScoringModel,
        selection: Optional[SelectionRecord],
        n_images: int,
        train_stats: Optional[dict[str, float]],
    ) -> None:
        """Take over a model file's scoring model, record, image count and training score statistics (``load``)."""
        self.model, self._lam_resolved, self.selection = model, True, selection
        self.n_images = n_images
        self._scores.set(train_stats)

    @property
    def uses_random_weights(self) -> bool:
        return self.weights_identity.get("kind") == "random"

    @property
    def weights_description(self) -> str:
        """One line for reports saying where the backbone weights came from."""
        return describe_weights(self.weights_identity, self.backbone_name)

    @property
    def is_fitted(self) -> bool:
        return self.model is not None and self.model.is_fitted

    # ---- images and features ------------------------------------------------------------------------
    def iter_batches(self, images: Images) -> Iterator[tuple[list[Optional[str]], torch.Tensor]]:
        """Yield (paths, normalised (B, 3, crop, crop) float32 batch on the detector's device); see batches.py."""
        return batches.iter_batches(images, self.preprocess, self.device, self.batch_size)

    def extract_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of a normalised (B, 3, H, W) batch, one per layer (inference mode)."""
        with torch.inference_mode():
            return self.extractor(x.to(self.device))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, d, h, w) of a normalised batch (the scorer's input, as in ``reference``)."""
        return self.embed_maps(self.extract_features(x))

    def embed_maps(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """Patch embeddings (B, d, h, w) of the backbone's feature maps (pooled, resized, concatenated or reduced)."""
        with torch.inference_mode():
            return embed_patches(feature_maps, self.embedding, self.target_dim)

    def _cpu_grids(self, x: torch.Tensor) -> torch.Tensor:
        """(n, P, d) float32 CPU patch grids of normalised CPU inputs, ``batch_size`` at a time."""
        step = self.batch_size
        grids = [
            patch_grids(self.embed(x[i : i + step].to(self.device))).float().cpu() for i in range(0, x.shape[0], step)
        ]
        # one batch (the pseudo-defects' calls): no concatenated copy beside it, at the choice's peak
        return grids[0] if len(grids) == 1 else torch.cat(grids)

    # ---- fitting ----------------------------------------------------------------------------------
    def fit(self, images: Images, progress: bool = True) -> "CRDDetector":
        """Fit on defect-free images, discarding any earlier fit and threshold.

        With lam_rel="auto" and/or spatial="auto" (the defaults), a few images are held out, pseudo-defects
        are painted on them, and the scoring model and lam_rel that describe and rank them best are chosen
        (crd_fast/selection); the model is then fitted on all images with that choice. The record is
        ``selection``. Fewer than 20 images: no selection (spatial "global", lam_rel 0.01).
        """
        self.threshold = None
        self.pixel_threshold = None
        return self.reset().partial_fit(images, progress)

    def partial_fit(self, images: Images, progress: bool = True) -> "CRDDetector":
        """Add defect-free images to the fit (online updates); from empty this is exactly ``fit``.

        On a fitted detector this updates the scoring model's statistics and keeps the chosen model and lam_rel:
        the label-free choice is not run again (``fit`` on all images chooses afresh).
        """
        if not self.is_fitted and self.selection_pending:
            return self._fit_selecting(images, progress)
        added = 0
        with batches.progress_bar(images, "fit", progress) as bar:
            for _, x in self.iter_batches(images):
                self.model.partial_fit(patch_grids(self.embed(x)))
                self._scores.remember(x)
                added += x.shape[0]
                bar.update(x.shape[0])
        if added == 0:
            raise ValueError("no images to fit on")
        self.n_images += added
        self._scores.model_changed()
        logger.info("added %d images to the fit (%d in all, d=%d)", added, self.n_images, self.dim)
        return self

    def _fit_selecting(self, images: Images, progress: bool) -> "CRDDetector":
        """Fit from empty while choosing what the options leave open (lam_rel and/or spatial "auto")."""
        started = time.perf_counter()
        count = batches.known_count(images)
        if count is not None and count < MIN_IMAGES:  # too few to hold any out: the defaults, fitted as usual
            self.settle_without_selection(count)
            try:
                self.partial_fit(images, progress)
            except BaseException:
                self.reset()  # still unfitted: the next fit chooses afresh
                raise
            self.selection.fit_seconds = round(time.perf_counter() - started, 4)
            return self
        selector = label_free_selector(self.options.to_dict(), self._lam_grid(), count, self.seed, self.model)
        with batches.progress_bar(images, "fit", progress) as bar:
            for _, x in self.iter_batches(images):
                selector.add(x, patch_grids(self.embed(x)))
                self._scores.remember(x)
                bar.update(x.shape[0])
        model, record = selector.finish(
            self._cpu_grids, self.preprocess.mean, self.preprocess.std, self.patch_grid, batch=self.batch_size
        )
        record.fit_seconds = round(time.perf_counter() - started, 4)
        self.model, self._lam_resolved, self.selection = model, True, record
        self.n_images += selector.seen
        self._scores.model_changed()
        logger.info(
            "fitted on %d images; spatial %s, lam_rel %g (%s; %.2f s of %.2f s)",
            selector.seen,
            model.name,
            record.lam_rel,
            record.reason(),
            record.seconds,
            record.fit_seconds,
        )
        return self

    def settle_without_selection(self, n_images: int) -> SelectionRecord:
        """Decide what lam_rel/spatial "auto" leave open as a fit of ``n_images`` (< 20) images does, without a
        selection: spatial "global" where open, lam_rel DEFAULT_LAM_REL where open; records why (``selection``)
        and returns the record. For an unfitted detector (e.g. before a distributed fit of few images)."""
        if self.is_fitted:
            raise RuntimeError("the detector is fitted: its scoring model and lam_rel are already chosen")
        self.model, self.selection = settled_model(self.options.to_dict(), self._lam_grid(), n_images, self.model)
        self._lam_resolved = True
        return self.selection

    def _lam_grid(self) -> tuple[float, ...]:
        """The lam_rel values a choice may take: the grid when lam_rel is "auto", else the one fixed value."""
        if not self._lam_resolved:
            return tuple(DEFAULT_LAM_GRID)
        return (float(self.model.lam_rel if self.model is not None else self._options.lam_rel),)

    @property
    def train_score_stats(self) -> Optional[dict[str, float]]:
        """Statistics of training image scores (n, mean, std, min, max, q50, q90, q95, q99), from a
        random sample of up to SCORE_SAMPLE training images; None before fitting."""
        return self._scores.statistics(self._image_scores)

    def set_train_score_stats(self, stats: Optional[dict[str, float]]) -> None:
        """Use ``stats`` as the training score statistics until the next fit (e.g. those of a quantized export's
        own scores, crd_fast.deploy.quantize); None: none (exports then record none)."""
        self._scores.set(stats)

    def _image_scores(self, x: torch.Tensor) -> np.ndarray:
        model = self.inference_model()
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                out.append(model(x[start : start + self.batch_size].to(self.device))[0].double().cpu())
        return torch.cat(out).numpy()

    # ---- inference --------------------------------------------------------------------------------
    def inference_model(self) -> InferenceModel:
        """The fitted extractor + the scoring model's head + mapper as one module, on the detector's device, in
        eval mode; rebuilt whenever the scoring model changes (new data or options: ``ScoringModel.cache_key``)."""
        if not self.is_fitted:
            raise RuntimeError("this CRDDetector is not fitted yet: call fit(images) first")
        key = self.model.cache_key()
        if self._inference is None or self._inference_for is None or self._inference_for[0] is not self.model:
            stale = True
        else:
            stale = self._inference_for[1] != key
        if stale:
            head = self.model.head(self.layout)
            self._inference = InferenceModel(self.extractor, head, self.mapper).to(self.device).eval()
            self._inference_for = (self.model, key)
        return self._inference

    def predict(self, images: Images, progress: bool = True) -> DetectionResult:
        """Image scores, anomaly maps and patch maps for ``images`` (labels once a threshold is set)."""
        model = self.inference_model()
        scores, amaps, pmaps, paths = [], [], [], []
        with batches.progress_bar(images, "predict", progress) as bar:
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

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write one model file (safetensors + JSON metadata, atomically) with everything predict needs."""
        save_detector(self, path)
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
        det = load_detector(cls, path, device, **expected)
        logger.info("loaded model %s (%s, d=%d, device %s)", path, det.backbone_name, det.dim, det.device)
        return det

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
