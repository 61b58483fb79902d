"""OnnxDetector: run an exported crd_fast model with onnxruntime, without torch.

    from crd_fast.deploy import OnnxDetector
    det = OnnxDetector("model.onnx")              # reads model.onnx.json beside it and checks they match
    result = det.predict("test/")                 # DetectionResult, as CRDDetector.predict returns

Only numpy, PIL and onnxruntime are imported here (and tqdm for an optional progress bar): an edge
device needs neither torch nor torchvision. Images are preprocessed exactly as the detector does
(``crd_fast.deploy.imaging``). A head-only export scores the caller's own backbone features instead:
``OnnxDetector("head.onnx").score_features({"layer2": f2, "layer3": f3})``.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..metrics.thresholds import check_threshold
from ..postprocess.results import DetectionResult
from .imaging import NumpyPreprocess, iter_images
from .metadata import (
    DIGEST_FIELD,
    ONNX_PROPS_KEY,
    DeployError,
    PathLike,
    check_expected,
    check_metadata_digest,
    metadata_path_for,
    read_onnx_and_metadata,
)

FeatureInput = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]


class OnnxDetector:
    """An exported detector (or head) run by onnxruntime, with the same predict API as CRDDetector.

    Args:
        path: the ONNX file written by ``crd_fast.deploy.export_onnx``.
        metadata_path: its metadata JSON (default: ``path`` + ".json").
        providers: onnxruntime execution providers (default: CPU only).
        batch_size: images per onnxruntime call (default: the detector's batch size).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        **expected: metadata values the caller requires (e.g. embedding="concat", crop=224, head_only=False);
            any that differ raise DeployError.
    """

    def __init__(
        self,
        path: PathLike,
        metadata_path: Optional[PathLike] = None,
        providers: Optional[Sequence[str]] = None,
        batch_size: Optional[int] = None,
        threads: Optional[int] = None,
        **expected: Any,
    ) -> None:
        import onnxruntime as ort

        self.path = os.fspath(path)
        data, meta = read_onnx_and_metadata(path, metadata_path)
        check_expected(meta, expected, path)
        self.metadata: dict[str, Any] = meta
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = check_threads(threads)
        try:
            self.session = ort.InferenceSession(
                data, sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise DeployError(f"{self.path}: onnxruntime cannot load this model ({type(exc).__name__}: {exc})") from exc
        self._check_signature()
        check_metadata_digest(meta, metadata_path or metadata_path_for(path), self._stamped_digest())
        self.head_only = bool(meta["head_only"])
        self.config: dict[str, Any] = dict(meta.get("config") or {})
        self.threshold: Optional[float] = meta.get("threshold")
        self.pixel_threshold: Optional[float] = meta.get("pixel_threshold")
        self.train_score_stats: Optional[dict[str, float]] = meta.get("train_score_stats")
        if batch_size is not None and (
            isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size if batch_size is not None else self.config.get("batch_size") or 8)
        self.preprocess: Optional[NumpyPreprocess] = None
        if not self.head_only:
            pre = meta.get("preprocess") or {}
            self.preprocess = NumpyPreprocess(int(pre["resize"]), int(pre["crop"]), pre["mean"], pre["std"])

    def _stamped_digest(self) -> Optional[str]:
        """The metadata digest stamped into the ONNX file at export (None in exports from before it)."""
        try:
            props = self.session.get_modelmeta().custom_metadata_map
            value = json.loads(props.get(ONNX_PROPS_KEY) or "{}").get(DIGEST_FIELD)
        except (AttributeError, ValueError):
            return None
        return value if isinstance(value, str) else None

    # ---- signature --------------------------------------------------------------------------------
    def _check_signature(self) -> None:
        """The session's inputs and outputs must be the ones the metadata describes."""
        got_in = [(i.name, list(i.shape)) for i in self.session.get_inputs()]
        want_in = [(i["name"], i["shape"]) for i in self.metadata["inputs"]]
        got_out = [o.name for o in self.session.get_outputs()]
        want_out = [o["name"] for o in self.metadata["outputs"]]
        if [n for n, _ in got_in] != [n for n, _ in want_in] or got_out != want_out:
            raise DeployError(
                f"{self.path}: the ONNX graph's inputs {[n for n, _ in got_in]} / outputs {got_out} differ from the "
                f"metadata's {[n for n, _ in want_in]} / {want_out}"
            )
        for (name, got), (_, want) in zip(got_in, want_in):
            fixed_got = [d if isinstance(d, int) else None for d in got]
            fixed_want = [d if isinstance(d, int) else None for d in want]
            if fixed_got != fixed_want:
                raise DeployError(f"{self.path}: input {name!r} has shape {got} in the graph, {want} in the metadata")

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.metadata["inputs"]]

    def _check_input(self, name: str, x: Any, batch: Optional[int]) -> np.ndarray:
        spec = next(i for i in self.metadata["inputs"] if i["name"] == name)
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise DeployError(f"input {name!r} must be floating point, got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        want = spec["shape"]
        shown = "(" + ", ".join(str(d) if isinstance(d, int) else "B" for d in want) + ")"
        if arr.ndim != len(want) or any(isinstance(w, int) and w != g for w, g in zip(want, arr.shape)):
            raise DeployError(f"input {name!r} must have shape {shown}, got {tuple(arr.shape)}")
        if batch is not None and arr.shape[0] != batch:
            raise DeployError(f"input {name!r} has batch size {arr.shape[0]}, the other inputs have {batch}")
        if not np.all(np.isfinite(arr)):
            raise DeployError(f"input {name!r} contains NaN or Inf")
        return arr

    # ---- whole detector -----------------------------------------------------------------------------
    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A normalised (B, 3, crop, crop) batch -> (image_scores float64, anomaly_maps float32, patch_maps float32)."""
        if self.head_only:
            raise DeployError(f"{self.path} is a head-only export: call score_features(feature_maps), not run/predict")
        arr = self._check_input(self.input_names[0], x, None)
        scores, amaps, pmaps = self.session.run(None, {self.input_names[0]: arr})
        return scores.astype(np.float64), amaps.astype(np.float32), pmaps.astype(np.float32)

    def predict(self, images: Any, progress: bool = False) -> DetectionResult:
        """Image scores, anomaly maps and patch maps for ``images`` (labels once a threshold is set).

        ``images``: a folder, an image file, a list of paths / PIL images / numpy arrays, or one image.
        """
        if self.head_only:
            raise DeployError(f"{self.path} is a head-only export: call score_features(feature_maps), not predict")
        assert self.preprocess is not None
        scores, amaps, pmaps, paths = [], [], [], []
        bar = _progress_bar(progress)
        pending: list[np.ndarray] = []

        def flush() -> None:
            s, a, p = self.run(np.stack(pending))
            scores.append(s), amaps.append(a), pmaps.append(p)
            if bar is not None:
                bar.update(len(pending))
            pending.clear()

        for index, (path, image) in enumerate(iter_images(images)):
            try:
                pending.append(self.preprocess(image))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"image {index}: {exc}") from exc
            paths.append(path)
            if len(pending) == self.batch_size:
                flush()
        if pending:
            flush()
        if bar is not None:
            bar.close()
        result = DetectionResult.from_batches(scores, amaps, pmaps, paths)
        result.apply_threshold(self.threshold, self.train_score_stats)
        return result.apply_pixel_threshold(self.pixel_threshold)

    def set_threshold(self, value: Optional[float]) -> None:
        """Override the exported threshold (score >= threshold is defective); None removes it."""
        self.threshold = check_threshold(value)

    def set_pixel_threshold(self, value: Optional[float]) -> None:
        """Override the exported pixel threshold of ``pred_masks``; None removes it."""
        self.pixel_threshold = check_threshold(value)

    # ---- head only ----------------------------------------------------------------------------------
    def score_features(self, feature_maps: FeatureInput) -> tuple[np.ndarray, np.ndarray]:
        """Head-only export: one (B, C_l, H_l, W_l) map per layer (a list in layer order, or a dict by layer
        name) -> (image_scores (B,) float64, patch_maps (B, h, w) float32)."""
        names = self.input_names
        if isinstance(feature_maps, Mapping):
            missing = [n for n in names if n not in feature_maps]
            extra = [k for k in feature_maps if k not in names]
            if missing or extra:
                raise DeployError(
                    f"feature maps must be given for layers {names}; missing {missing}, unexpected {extra}"
                )
            given = [feature_maps[n] for n in names]
        else:
            given = list(feature_maps)
            if len(given) != len(names):
                raise DeployError(f"expected {len(names)} feature maps ({', '.join(names)}), got {len(given)}")
        feeds: dict[str, np.ndarray] = {}
        batch: Optional[int] = None
        for name, x in zip(names, given):
            feeds[name] = self._check_input(name, x, batch)
            batch = feeds[name].shape[0]
        outputs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)))
        return outputs["image_scores"].astype(np.float64), outputs["patch_maps"].astype(np.float32)

    def __repr__(self) -> str:
        what = "head only" if self.head_only else "whole detector"
        return f"OnnxDetector({self.path!r}, {what}, inputs={self.input_names})"


def check_threads(threads: Any) -> int:
    """A thread count: an integer in [1, the machine's CPU count] (a huge one would exhaust memory)."""
    most = os.cpu_count() or 1
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= most:
        raise ValueError(f"threads must be an integer in [1, {most}] (this machine's CPU count), got {threads!r}")
    return int(threads)


def _progress_bar(progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="predict", unit="img", dynamic_ncols=True)
