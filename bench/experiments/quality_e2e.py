"""quality.py's end-to-end rows: methods that run on the images, not on the cached features.

- ``detector_rows``: crd-fast's own CRDDetector, fitted on the training images and predicting the test
  images (its preprocessing, backbone, label-free selection, head and anomaly maps), with lam_rel="auto" and
  spatial="auto";
- ``anomalib_rows``: anomalib 2.7's Padim and Patchcore, run by quality_anomalib.py here in anomalib's own
  environment (a subprocess with ``--anomalib-python``; anomalib is never imported here), on the same
  normalised tensors the cached features were extracted from and the same seeded random wide_resnet50_2.

Both score with this project's image AUROC (crd_fast.metrics.scores) on the methods' own image scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from quality_data import BACKBONES, _unit

from crd_fast.features.backbone import build_backbone, input_normalisation
from crd_fast.features.preprocess import Preprocess
from crd_fast.metrics.scores import image_auroc

RUNNER = Path(__file__).resolve().parent / "quality_anomalib.py"
ANOMALIB_LABELS = {
    "padim": "anomalib 2.7 Padim (layer1-3, 550 random channels)",
    "patchcore": "anomalib 2.7 Patchcore (layer2+3, 10% coreset, 9 neighbours)",
}

ImagesFn = Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _row(method: str, value: float, seconds: float | None, note: str = "", **extra: Any) -> dict:
    print(f"  {method:<48} {value:.4f}  {'' if seconds is None else f'{seconds:7.1f} s'}  {note}", flush=True)
    return {"method": method, "image_auroc": value, "seconds": seconds, "note": note, **extra}


def _jsonable(value: Any) -> Any:
    """The detector's selection record as JSON-ready data (it may be a dataclass with ``to_json``)."""
    if hasattr(value, "to_json"):
        value = value.to_json()
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def detector_rows(key: str, images_fn: ImagesFn, resize: int, crop: int, args) -> list[dict]:
    """CRDDetector(lam_rel="auto", spatial="auto") end to end on the run's images: one row."""
    from crd_fast.detector import CRDDetector

    train, test, labels = images_fn()
    backbone, layers, weights = BACKBONES[key]
    det = CRDDetector(
        backbone=backbone,
        weights=weights,
        layers=layers,
        resize=resize,
        crop=crop,
        seed=args.seed,
        batch_size=args.batch,
        lam_rel="auto",
        spatial="auto",
    )
    t0 = time.perf_counter()
    det.fit(list(train), progress=False)
    t1 = time.perf_counter()
    result = det.predict(list(test), progress=False)
    t2 = time.perf_counter()
    auc = float(image_auroc(labels, result.image_scores))
    note = (
        f"chose spatial {det.spatial_choice}, lam_rel {float(det.lam_rel):g}; "
        f"fit {t1 - t0:.0f} s (incl. selection), predict {t2 - t1:.0f} s"
    )
    return [
        _row(
            "CRDDetector defaults (lam_rel auto, spatial auto), end to end",
            auc,
            t1 - t0,
            note,
            predict_seconds=t2 - t1,
            spatial_choice=str(det.spatial_choice),
            lam_rel=float(det.lam_rel),
            selection=_jsonable(det.selection),
        )
    ]


def anomalib_rows(key: str, images_fn: ImagesFn, resize: int, crop: int, args) -> list[dict]:
    """anomalib's Padim and Patchcore on the run's images (seeded random wide_resnet50_2 only)."""
    backbone, _, weights = BACKBONES[key]
    if (backbone, weights) != ("wide_resnet50_2", "random"):
        raise ValueError(f"the anomalib rows use the seeded random wide_resnet50_2, not {key}")
    train, test, labels = images_fn()
    pre = Preprocess(resize, crop, *input_normalisation(weights, backbone))
    with tempfile.TemporaryDirectory(prefix="crd_quality_anomalib_") as tmp:
        data = Path(tmp)
        for split, imgs in (("train", train), ("test", test)):
            np.save(data / f"{split}.npy", pre.normalize(_unit(imgs, pre)).numpy().astype(np.float32))
        from safetensors.torch import save_file

        # the weights FeatureExtractor(backbone, layers, "random", seed) builds for the cached features
        state = build_backbone(backbone, weights, args.seed).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(data / "backbone.safetensors"))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # anomalib's side never sees crd-fast
        cmd = [args.anomalib_python, str(RUNNER), "--data", tmp, "--out", str(data / "scores.json")]
        cmd += ["--batch", str(args.batch), "--threads", str(torch.get_num_threads())]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        wall = time.perf_counter() - t0
        out = json.loads((data / "scores.json").read_text())
    rows = []
    for name, res in out["models"].items():
        scores = np.asarray(res["scores"])
        if scores.shape != labels.shape:
            raise RuntimeError(f"anomalib {name} returned {scores.shape} scores for {labels.shape} test images")
        rows.append(
            _row(
                ANOMALIB_LABELS[name],
                float(image_auroc(labels, scores)),
                res["fit_seconds"],
                f"anomalib {out['anomalib']}, torch {out['torch']}; predict {res['predict_seconds']:.0f} s",
                predict_seconds=res["predict_seconds"],
                checks=res["checks"],
            )
        )
    print(f"  (anomalib subprocess wall time {wall:.0f} s)", flush=True)
    return rows
