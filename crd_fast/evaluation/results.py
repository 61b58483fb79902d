"""What an evaluation produced per category (the report's input), and which of its images are worth a look."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..io.tensors import numpy_if_tensor
from ..metrics.pixels import check_pixel_threshold, predict_masks

ImagesInput = Union[np.ndarray, Sequence[Optional[np.ndarray]], Mapping[int, np.ndarray], None]


@dataclass
class CategoryResult:
    """Evaluation output of one category (one data set split into good and defective test images).

    labels: (N,) 1 = defective, 0 = good.  image_scores: (N,).
    masks / anomaly_maps: (N, H, W) ground truth (non-zero = defect) and maps at the same resolution, or None.
    images: the images the model saw (uint8 (H, W, 3), at the maps' resolution), for overlays: an (N, H, W, 3)
        array, a length-N sequence with None for images not kept, a dict {index: image} (e.g. only those
        :func:`example_indices` picks), or None.
    paths, defect_types: per image (defaults: "image_<i>", and "good"/"defect" from the labels).
    fit_seconds, ms_per_image: timings shown in the table.
    extra: further figures shown next to the metrics, e.g. {"nn": {"image_auroc": 0.97, "ms_per_image": 40}}.
    pixel_threshold: the detector's pixel threshold, or None; with one, the predicted masks
        (anomaly_maps >= pixel_threshold) are outlined in the overlays and scored by pixel F1.
    selection: the detector's label-free choice record (``CRDDetector.selection``), or None; shown as the
        chosen spatial model and lam_rel with the validation curve.
    peer_scores: other scoring rules' image scores of the same images, ``{rule: (N,)}`` (e.g. "nn", "padim", as in
        ``extra``), or None; their ROC curves are drawn beside the detector's.
    """

    name: str
    labels: Any
    image_scores: Any
    masks: Optional[Any] = None
    anomaly_maps: Optional[Any] = None
    images: ImagesInput = None
    paths: Optional[Sequence[Optional[str]]] = None
    defect_types: Optional[Sequence[str]] = None
    fit_seconds: Optional[float] = None
    ms_per_image: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)
    pixel_threshold: Optional[float] = None
    selection: Optional[dict[str, Any]] = None
    peer_scores: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        labels = _numpy(self.labels)
        scores = _numpy(self.image_scores)
        if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
            raise ValueError(
                f"category {self.name!r}: labels and image_scores must be 1-D of the same length, "
                f"got shapes {labels.shape} and {scores.shape}"
            )
        n = labels.shape[0]
        if n == 0:
            raise ValueError(f"category {self.name!r}: no test images")
        if not set(np.unique(labels).tolist()) <= {0, 1}:
            raise ValueError(f"category {self.name!r}: labels must be 0 (good) or 1 (defective)")
        if scores.dtype.kind not in "fiu" or not np.isfinite(scores).all():
            raise ValueError(f"category {self.name!r}: image_scores must be finite numbers")
        self.labels = labels.astype(bool)
        self.image_scores = scores.astype(np.float64)
        if self.anomaly_maps is not None:
            self.anomaly_maps = _numpy(self.anomaly_maps)
            if self.anomaly_maps.ndim != 3 or self.anomaly_maps.shape[0] != n:
                raise ValueError(
                    f"category {self.name!r}: anomaly_maps must be ({n}, H, W), got {self.anomaly_maps.shape}"
                )
        if self.masks is not None:
            self.masks = _numpy(self.masks) != 0
            if self.masks.ndim != 3 or self.masks.shape[0] != n:
                raise ValueError(f"category {self.name!r}: masks must be ({n}, H, W), got {self.masks.shape}")
            if self.anomaly_maps is not None and self.masks.shape != self.anomaly_maps.shape:
                raise ValueError(
                    f"category {self.name!r}: masks {self.masks.shape} and anomaly_maps "
                    f"{self.anomaly_maps.shape} differ in shape"
                )
        self.pixel_threshold = check_pixel_threshold(self.pixel_threshold)
        self.paths = [f"image_{i}" for i in range(n)] if self.paths is None else [str(p) for p in self.paths]
        if len(self.paths) != n:
            raise ValueError(f"category {self.name!r}: {len(self.paths)} paths for {n} images")
        if self.defect_types is None:
            self.defect_types = ["defect" if y else "good" for y in self.labels]
        self.defect_types = [str(t) for t in self.defect_types]
        if len(self.defect_types) != n:
            raise ValueError(f"category {self.name!r}: {len(self.defect_types)} defect types for {n} images")
        if self.peer_scores is not None:
            peers = {str(k): _numpy(v).astype(np.float64) for k, v in self.peer_scores.items()}
            bad = [k for k, v in peers.items() if v.shape != (n,) or not np.isfinite(v).all()]
            if bad:
                raise ValueError(f"category {self.name!r}: peer_scores {bad} must be {n} finite scores each")
            self.peer_scores = peers

    @property
    def pred_masks(self) -> Optional[np.ndarray]:
        """(N, H, W) bool predicted masks, or None without anomaly maps or a pixel threshold."""
        if self.anomaly_maps is None or self.pixel_threshold is None:
            return None
        return predict_masks(self.anomaly_maps, self.pixel_threshold)

    @property
    def n_images(self) -> int:
        return int(self.labels.shape[0])

    def image(self, index: int) -> Optional[np.ndarray]:
        """The stored image of test image ``index`` (uint8 (H, W, 3)), or None if it was not kept."""
        imgs = self.images
        if imgs is None:
            return None
        if isinstance(imgs, Mapping):
            return imgs.get(index)
        if index >= len(imgs):
            return None
        return imgs[index]


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(numpy_if_tensor(x))


def example_indices(labels: Any, image_scores: Any, n: int = 4) -> dict[str, list[int]]:
    """The images worth looking at: ``{"highest_defects", "lowest_defects", "highest_good"}`` index lists.

    Highest-scoring defective images (found best), lowest-scoring defective images (missed first) and
    highest-scoring good images (false alarms first), ``n`` each at most, ties broken by index.
    """
    y = _numpy(labels).astype(bool)
    s = _numpy(image_scores).astype(np.float64)
    idx = np.arange(len(y))
    defects, good = idx[y], idx[~y]
    # lexsort: last key is primary; the index breaks ties so the choice is deterministic
    high_def = defects[np.lexsort((defects, -s[defects]))][:n]
    low_def = defects[np.lexsort((defects, s[defects]))][:n]
    high_good = good[np.lexsort((good, -s[good]))][:n]
    return {
        "highest_defects": high_def.tolist(),
        "lowest_defects": low_def.tolist(),
        "highest_good": high_good.tolist(),
    }
