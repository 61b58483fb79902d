"""anomalib 2.7 Padim and Patchcore on bench/experiments/quality.py's images, in anomalib's own environment.

    ANOMALIB_VENV/bin/python bench/experiments/quality_anomalib.py --data DIR --out scores.json

Run by quality.py here (option --anomalib-python), never imported by it: this script imports anomalib and
torch only (no crd_fast), so it runs with the anomalib environment's interpreter. DIR holds what the driver
wrote: train.npy and test.npy, the images already resized, cropped and normalised as (N, 3, H, W) float32
(the same tensors crd-fast's extractor sees), and backbone.safetensors, the state dict of the seeded random
torchvision wide_resnet50_2 every method of the row uses. Writes the image scores (anomalib's pred_score) of
every model, in test order, with fit and predict seconds; the driver computes the image AUROC with its own
metric.

Models (anomalib's torch models, no Lightning, no pre-/post-processing: the inputs are already normalised):
- Padim: layers layer1-3, n_features 550 (anomalib's default for wide_resnet50_2), channel subset seeded
  with torch.manual_seed(0); image score = max of the blurred anomaly map (anomalib's rule).
- Patchcore: layers layer2+layer3, coreset ratio 0.1 (k-center greedy, start point seeded), 9 neighbours;
  image score = anomalib's reweighted nearest-neighbour distance.
Both share one backbone pass per image (``Replay``); fit and predict seconds include that pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODELS = ("padim", "patchcore")
PADIM_FEATURES = 550
CORESET_RATIO = 0.1
NEIGHBOURS = 9


def build(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The anomalib torch model ``name`` with the given backbone state (the classifier and layer4 unused)."""
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    torch.manual_seed(0)  # PaDiM's random channel subset
    if name == "padim":
        model = PadimModel(
            backbone="wide_resnet50_2",
            layers=["layer1", "layer2", "layer3"],
            pre_trained=False,
            n_features=PADIM_FEATURES,
        )
    else:
        model = PatchcoreModel(
            layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False, num_neighbors=NEIGHBOURS
        )
    _load(model.feature_extractor, state)
    return model


def _load(extractor: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = extractor.feature_extractor.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("fc.", "layer4."))]
    if missing or unexpected:
        raise RuntimeError(f"backbone state does not fit anomalib's extractor: {missing[:3]} {unexpected[:3]}")


class Replay(torch.nn.Module):
    """Stands in for an anomalib model's feature extractor: returns the stored features of the next batch.

    The backbone pass is shared by both models (one wide_resnet50_2 pass over layer1-3 per image instead of
    one per model: the 2-core machine cannot afford two); ``check`` compares the model's own extractor with
    the stored features on the first batch before the replay replaces it.
    """

    def __init__(self, batches: list[dict[str, torch.Tensor]], layers: list[str]) -> None:
        super().__init__()
        self.batches, self.layers, self.next = batches, list(layers), 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.batches[self.next]
        if feats[self.layers[0]].shape[0] != x.shape[0]:
            raise RuntimeError(f"replayed batch {self.next} has {feats[self.layers[0]].shape[0]} images, not {len(x)}")
        self.next += 1
        return {k: feats[k] for k in self.layers}


def extract(state: dict[str, torch.Tensor], x: np.ndarray, batch: int) -> list[dict[str, torch.Tensor]]:
    """Features (layer1-3) of every batch of ``x`` from anomalib's timm wide_resnet50_2 with ``state``."""
    from anomalib.models.components import TimmFeatureExtractor

    net = TimmFeatureExtractor(backbone="wide_resnet50_2", layers=["layer1", "layer2", "layer3"], pre_trained=False)
    _load(net, state)
    net.eval()
    with torch.inference_mode():
        return [{k: v.clone() for k, v in net(xb).items()} for xb in _batches(x, batch)]


def check_replay(model: torch.nn.Module, x: torch.Tensor, stored: dict[str, torch.Tensor]) -> float:
    """Largest |difference| between the model's own extractor and the stored features on one batch."""
    with torch.inference_mode():
        own = model.feature_extractor(x)
    return max(float((own[k] - stored[k]).abs().max()) for k in own)


def _batches(x: np.ndarray, batch: int):
    for s in range(0, x.shape[0], batch):
        yield torch.from_numpy(np.array(x[s : s + batch]))  # a writable copy of the memory-mapped rows


def _padim_inverse_error(model: torch.nn.Module, cov: dict[int, torch.Tensor]) -> float:
    """Largest |inv_covariance @ covariance - I| over the positions in ``cov`` (checks anomalib's inversion)."""
    inv = model.gaussian.inv_covariance
    if not torch.isfinite(inv).all():
        raise RuntimeError("anomalib's Padim inverse covariances are not finite")
    eye = torch.eye(inv.shape[-1], dtype=torch.float64)
    return max(float((inv[p].double() @ c - eye).abs().max()) for p, c in cov.items())


def _float32_inverse_error(cov: dict[int, torch.Tensor]) -> float:
    """The same residual for one float32 matrix at a time: what float32 reaches on these matrices."""
    eye = torch.eye(next(iter(cov.values())).shape[0], dtype=torch.float64)
    return max(float((torch.linalg.inv(c.float()).double() @ c - eye).abs().max()) for c in cov.values())


def _padim_covariances(model: torch.nn.Module, positions: int = 3) -> dict[int, torch.Tensor]:
    """anomalib's regularised covariance (cov + 0.01 I + 1e-5 I) at a few positions, in float64, before ``fit``."""
    emb = torch.vstack(model.memory_bank).double()  # (N, C, H, W)
    x = emb.reshape(emb.shape[0], emb.shape[1], -1)
    out = {}
    for p in np.linspace(0, x.shape[2] - 1, positions).astype(int).tolist():
        c = torch.cov(x[:, :, p].T)
        out[p] = c + (0.01 + 1e-5) * torch.eye(c.shape[0], dtype=torch.float64)
    return out


def fit(name: str, model: torch.nn.Module, train: np.ndarray, batch: int) -> dict:
    """Fit ``model`` on ``train`` (its feature extractor replays stored features); returns checks of the fit."""
    checks: dict = {}
    model.train()
    with torch.no_grad():
        for xb in _batches(train, batch):
            model(xb)
        if name == "padim":
            cov = _padim_covariances(model)
            # torch 2.14.1's CPU batched LU (linalg.inv on a (P, C, C) stack, C >= ~200) returns garbage pivots
            # with more than one thread on this machine; one thread inverts correctly (checked below).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                model.fit()
            finally:
                torch.set_num_threads(threads)
            checks["max_abs_inv_cov_times_cov_minus_eye"] = _padim_inverse_error(model, cov)
            checks["same_for_single_float32_inverses"] = _float32_inverse_error(cov)
        else:
            torch.manual_seed(0)  # the coreset's random start point
            np.random.seed(0)  # its sparse random projection (sklearn, numpy's global generator)
            model.subsample_embedding(CORESET_RATIO)
            checks["coreset_size"] = int(model.memory_bank.shape[0])
    model.eval()
    return checks


def scores(model: torch.nn.Module, test: np.ndarray, batch: int) -> list[float]:
    with torch.inference_mode():
        return [float(v) for xb in _batches(test, batch) for v in model(xb).pred_score.double().reshape(-1)]


def main(argv=None) -> None:
    import anomalib
    from safetensors.torch import load_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)
    train = np.load(args.data / "train.npy", mmap_mode="r")
    test = np.load(args.data / "test.npy", mmap_mode="r")
    state = load_file(str(args.data / "backbone.safetensors"))
    out = {"anomalib": anomalib.__version__, "torch": torch.__version__, "models": {}}
    t0 = time.perf_counter()
    feats = {"train": extract(state, train, args.batch)}
    t1 = time.perf_counter()
    feats["test"] = extract(state, test, args.batch)
    t2 = time.perf_counter()
    out["backbone_seconds"] = {"train": t1 - t0, "test": t2 - t1}
    print(f"[quality_anomalib] backbone: train {t1 - t0:.1f} s, test {t2 - t1:.1f} s", flush=True)
    first = next(_batches(train, args.batch))
    for name in args.models:
        model = build(name, state)
        layers = list(model.layers)
        replay_diff = check_replay(model, first, feats["train"][0])
        model.feature_extractor = Replay(feats["train"], layers)
        t0 = time.perf_counter()
        checks = fit(name, model, train, args.batch)
        t1 = time.perf_counter()
        model.feature_extractor = Replay(feats["test"], layers)
        s = scores(model, test, args.batch)
        t2 = time.perf_counter()
        checks["own_extractor_vs_replayed_max_abs_diff"] = replay_diff
        out["models"][name] = {
            "scores": s,
            "fit_seconds": t1 - t0 + out["backbone_seconds"]["train"],
            "predict_seconds": t2 - t1 + out["backbone_seconds"]["test"],
            "fit_own_seconds": t1 - t0,
            "checks": checks,
        }
        print(
            f"[quality_anomalib] {name}: fit {t1 - t0:.1f} s + backbone, predict {t2 - t1:.1f} s, {checks}", flush=True
        )
        del model
    args.out.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
