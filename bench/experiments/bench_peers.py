"""crd-fast against anomalib 2.7 PaDiM and PatchCore: predict images/s and fit seconds, one run, round-robin.

    python bench/experiments/bench_peers.py --anomalib-python ANOMALIB_VENV/bin/python [--train 64 --test 32]
    python bench/experiments/bench_peers.py --train 200 --test 16 --anomalib-python ...   # the users' case, ~35 min

The training set size matters to the predict comparison: PatchCore searches a bank of 10% of the training
patches (1,254 with 16 images, 15,680 with 200), so its predict slows as users add images and CRD's does not.

anomalib is never imported here: it runs in its own environment, in a worker subprocess started with
``--anomalib-python``; crd-fast runs in a second worker started with this interpreter. The driver (this
process) writes the images once, as normalised float32 tensors (.npy, the same bytes for every model),
and then

1. fits every model once, in turn (seconds, wall clock: feature extraction + the model's own fit: CRD's
   float64 statistics and projection, PaDiM's Gaussians, PatchCore's 10% k-center-greedy coreset), and
   times the backbone alone in each worker (on BACKBONE_BATCHES batches, scaled to the training set) so
   the fit's own part shows;
2. times predict round-robin: each round sends one batch to every model in turn (one model computes at
   a time, each worker holding its model warm), so a change in the shared machine's load hits all alike;
3. scores the test images with every model for the image AUROC (random weights: not real accuracy).

Every model uses the same seeded random torchvision wide_resnet50_2 (the state dict is written once and
loaded into anomalib's timm feature extractor, strictly apart from the classifier). Configurations:
crd-fast layer2+layer3 concat, lam_rel 0.01 and spatial "global" given (so its fit is the statistics and the
projection), per precision (fp32 contiguous; bf16 where the processor has it; "crd-auto" where "auto" chooses
fp32, which then runs channels_last; where it chooses bf16, the bf16 row is auto's); in --fit-only runs also
bf16 with the defaults (lam_rel and spatial chosen by the label-free selection, from 20 images); and the fitted fp32
detector exported to float32 ONNX and to int8 ONNX (``crd_fast.deploy.quantize``, calibrated on the first
32 training images; their "fit" is the export, after the fp32 fit, and is not compared with anyone's fit);
PaDiM layer1-3, n_features PADIM_FEATURES (100; see there);
PatchCore layer2+layer3, coreset ratio 0.1, 9 neighbours. Image decoding is excluded on every side.
The result is printed as JSON and written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

BATCH, CROP = 8, 224
#: Batches the backbone-only time is measured on (then scaled to the training set).
BACKBONE_BATCHES = 2
#: k-center-greedy steps left out of the per-step mean of a capped coreset selection (first-touch effects).
WARMUP_STEPS = 10
#: PaDiM's kept channels. anomalib's default for wide_resnet50_2 is 550, whose 56 x 56 per-position
#: covariances and inverses (2 x 3136 x 550^2 float32 = 7.6 GB, plus temporaries) do not fit this machine's
#: shared 23 GB; 100 (its resnet18 default) makes PaDiM's fit and predict cheaper, so ratios against it are
#: conservative.
PADIM_FEATURES = int(os.environ.get("CRD_PEERS_PADIM_FEATURES", "100"))


# ---- workers ---------------------------------------------------------------------------------------
def _worker_models(kind: str, weights: str, layers_crd: tuple[str, ...]) -> dict[str, Any]:
    import torch

    if kind == "crd":
        from crd_fast.benchmark.machine import require_fused_cpu_pass
        from crd_fast.core.precision import cpu_native_bf16, resolve_precision
        from crd_fast.detector.detector import CRDDetector

        require_fused_cpu_pass()

        models = {}
        paths = ["crd-fp32"]
        # timed wherever the processor has native bf16, also where "auto" measured it no faster and keeps fp32
        if cpu_native_bf16()[0]:
            paths += ["crd-bf16", "crd-bf16-defaults"]
        if resolve_precision("auto", "cpu").precision == "fp32":
            paths.append("crd-auto")  # auto's fp32 runs channels_last: not the contiguous crd-fp32 row
        for name in paths:
            # explicit lam_rel and spatial: the fit is the statistics and the projection, nothing chosen;
            # "-defaults" leaves both to the label-free selection (fitted in --fit-only runs only)
            chosen = {} if name.endswith("-defaults") else {"lam_rel": 0.01, "spatial": "global"}
            det = CRDDetector(
                backbone="wide_resnet50_2",
                weights=weights,
                layers=layers_crd,
                resize=CROP,
                crop=CROP,
                batch_size=BATCH,
                seed=0,
                **chosen,
            )
            det.extractor.set_precision(resolve_precision(name.split("-")[1], "cpu"))
            models[name] = det
        models["crd-onnx-fp32"] = models["crd-onnx-int8"] = None  # exported from crd-fp32 once it is fitted
        return models
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from safetensors.torch import load_file

    state = load_file(weights)
    torch.manual_seed(0)  # PaDiM's random channel subset
    models = {
        "anomalib-padim": PadimModel(
            backbone="wide_resnet50_2",
            layers=["layer1", "layer2", "layer3"],
            pre_trained=False,
            n_features=PADIM_FEATURES,
        ),
        "anomalib-patchcore": PatchcoreModel(
            layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False, num_neighbors=9
        ),
    }
    for m in models.values():
        result = m.feature_extractor.feature_extractor.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        unexpected = [k for k in result.unexpected_keys if not k.startswith(("fc.", "layer4."))]
        if missing or unexpected:
            raise RuntimeError(f"backbone state does not fit anomalib's extractor: {missing[:3]} {unexpected[:3]}")
        m.eval()
    return models


def _batches(x: np.ndarray):
    import torch

    for s in range(0, x.shape[0], BATCH):
        yield torch.from_numpy(x[s : s + BATCH])


def _export(name: str, det: Any, train: np.ndarray, folder: str) -> Any:
    """crd-fp32 (fitted) exported to float32 or int8 ONNX; int8 calibrated on the first training images."""

    from crd_fast.deploy import OnnxDetector, export_onnx
    from crd_fast.deploy.quantize import DEFAULT_CALIBRATION_IMAGES, export_onnx_int8

    path = os.path.join(folder, f"{name}.onnx")
    if name.endswith("int8"):
        export_onnx_int8(det, path, _unit_images(det, train[:DEFAULT_CALIBRATION_IMAGES]))
    else:
        export_onnx(det, path)
    return OnnxDetector(path)


def _fit(name: str, model: Any, train: np.ndarray, coreset_steps: int = 0) -> Optional[dict[str, Any]]:
    import torch

    if name.startswith("crd"):
        _crd_fit(model, train)
        return None
    model.train()
    with torch.no_grad():
        for xb in _batches(train):
            model(xb)
    if name.endswith("padim"):
        model.fit()
    elif coreset_steps:
        model.eval()
        return _capped_coreset(model, coreset_steps)
    else:
        model.subsample_embedding(0.1)
        model.eval()
        # the search's size: with 16 training images the bank is ~1,250 patches and PatchCore's predict is
        # nearly all backbone; with 200, 15,680 patches and the search costs about twice the backbone
        return {"memory_bank_rows": int(model.memory_bank.shape[0])}
    model.eval()
    return None


class _CoresetCapped(Exception):
    pass


def _capped_coreset(model: Any, steps: int) -> dict[str, Any]:
    """PatchCore's own 10% coreset selection, stopped after ``steps`` k-center-greedy steps.

    Every step costs the same (the distance of all N projected patches to the new centre, then the running
    minimum and its arg-max), so the whole selection's time is extrapolated from the steps taken: their mean
    after the first WARMUP_STEPS, times the steps left. The time until the first step (feature concatenation,
    the random projection's fit and transform) is measured whole.
    """
    from anomalib.models.components.sampling import k_center_greedy as kcg

    original = kcg.KCenterGreedy.update_distances
    stamps: list[float] = []
    total: dict[str, int] = {}

    def timed(self: Any, cluster_center: Any) -> None:
        stamps.append(time.perf_counter())
        total["steps"] = self.coreset_size - 1
        if len(stamps) > steps:
            raise _CoresetCapped
        original(self, cluster_center)

    start = time.perf_counter()
    kcg.KCenterGreedy.update_distances = timed
    try:
        model.subsample_embedding(0.1)
        raise RuntimeError(f"the coreset selection ended before {steps} steps: run it uncapped")
    except _CoresetCapped:
        pass
    finally:
        kcg.KCenterGreedy.update_distances = original
    per_step = float(np.mean(np.diff(stamps[WARMUP_STEPS:])))
    before_steps = stamps[0] - start
    return {
        "seconds_before_first_step": before_steps,
        "steps_timed": len(stamps) - 1,
        "steps_total": total["steps"],
        "seconds_per_step": per_step,
        "extrapolated_selection_s": before_steps + per_step * total["steps"],
    }


def _unit_images(det: Any, normalised: np.ndarray) -> Any:
    """The driver's normalised images back in [0, 1], what crd-fast's fit and calibration take (the crop is
    already applied, so the detector's preprocessing only normalises them again)."""
    import torch

    mean = torch.tensor(det.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(det.preprocess.std).view(1, 3, 1, 1)
    return (torch.from_numpy(normalised) * std + mean).clamp(0, 1)


def _crd_fit(det: Any, train: np.ndarray) -> None:
    # the detector's own public fit, as a user calls it
    det.fit(_unit_images(det, train), progress=False)
    det.inference_model()  # the projection (eigendecomposition) is part of the fit


def _predict(name: str, model: Any, xb: Any) -> np.ndarray:
    import torch

    with torch.inference_mode():
        if name.startswith("crd-onnx"):
            return model.run(xb.numpy())[0]
        if name.startswith("crd"):
            return model.inference_model()(xb)[0].double().numpy()
        return model(xb).pred_score.double().reshape(-1).numpy()


def _backbone(name: str, model: Any, train: np.ndarray) -> Any:
    """Seconds of the backbone alone on the training images, timed on BACKBONE_BATCHES batches and scaled."""
    import torch

    if name.startswith("crd-onnx"):
        return None  # the exported graph has no separate backbone to time

    batches = list(_batches(train))
    timed = batches[:BACKBONE_BATCHES]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for xb in timed:
            if name.startswith("crd"):
                model.extractor(xb)
            else:
                model.feature_extractor(xb)
    return (time.perf_counter() - t0) * len(batches) / len(timed)


def _worker_facts(kind: str) -> dict[str, Any]:
    """What the worker's timings depend on: torch and its threads; for crd-fast, which kernels are built."""
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if kind == "crd":
        import crd_fast
        from crd_fast.benchmark.machine import machine_info

        facts["crd_fast"] = crd_fast.__file__
        facts["machine"] = machine_info()
    return facts


def worker(kind: str, data_dir: str, weights: str) -> None:
    """Line protocol on stdin/stdout: 'fit NAME', 'backbone NAME', 'predict NAME I', 'score NAME', 'quit'."""
    import torch

    train = np.load(os.path.join(data_dir, "train.npy"))
    test = np.load(os.path.join(data_dir, "test.npy"))
    models = _worker_models(kind, weights, ("layer2", "layer3"))
    print(json.dumps({"ready": list(models), **_worker_facts(kind)}), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "quit":
            break
        name = args[0]
        model = models[name]
        t0 = time.perf_counter()
        out: Any = None
        if cmd == "fit" and name.startswith("crd-onnx"):
            models[name] = model = _export(name, models["crd-fp32"], train, data_dir)
        elif cmd == "fit":
            out = _fit(name, model, train, int(args[1]) if len(args) > 1 else 0)
        elif cmd == "backbone":
            out = _backbone(name, model, train)
        elif cmd == "predict":
            i = int(args[1]) % max(1, test.shape[0] // BATCH)
            _predict(name, model, torch.from_numpy(test[i * BATCH : (i + 1) * BATCH]))
        elif cmd == "score":
            out = np.concatenate([_predict(name, model, xb) for xb in _batches(test)]).tolist()
        print(json.dumps({"s": time.perf_counter() - t0, "out": out}), flush=True)


# ---- driver ----------------------------------------------------------------------------------------
class Worker:
    def __init__(self, python: str, kind: str, data_dir: str, weights: str) -> None:
        self.kind = kind
        env = dict(os.environ)
        if kind == "crd":  # the worker imports the crd_fast this driver imported (installed and compiled)
            import crd_fast

            package_root = str(Path(crd_fast.__file__).resolve().parents[1])
            env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        else:
            env.pop("PYTHONPATH", None)  # the anomalib environment never sees crd-fast
        self.proc = subprocess.Popen(
            [python, __file__, "--worker", kind, "--data", data_dir, "--weights", weights],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.kind} exited (code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, *words: Any) -> dict[str, Any]:
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        print(f"[bench_peers] {' '.join(str(w) for w in words)}: {answer['s']:.3f} s", file=sys.stderr, flush=True)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _write_data(data_dir: Path, n_train: int, n_test: int) -> np.ndarray:
    import torch
    from safetensors.torch import save_file

    from crd_fast.features.backbone import build_backbone
    from crd_fast.features.preprocess import Preprocess, load_image
    from crd_fast.synthetic import generate_dataset

    half = n_test // 2
    ds = generate_dataset(
        data_dir / "images", ("fabric",), n_train=n_train, n_test_good=n_test - half, n_test_defect=half, seed=0
    )
    files = ds.files["fabric"]
    pre = Preprocess(256, CROP)
    test_paths = [p for k, v in files.items() if k.startswith("test/") for p in v]
    labels = np.array([0 if p.parent.name == "good" else 1 for p in test_paths])
    for split, paths in (("train", files["train/good"]), ("test", test_paths)):
        arr = torch.stack([pre(load_image(str(p))) for p in paths]).numpy().astype(np.float32)
        np.save(data_dir / f"{split}.npy", arr)
    state = {k: v.contiguous() for k, v in build_backbone("wide_resnet50_2", "random", 0).state_dict().items()}
    save_file(state, str(data_dir / "wide_resnet50_2_random_seed0.safetensors"))
    return labels


def _fit_only(args: argparse.Namespace, argv: Any, owner: dict[str, "Worker"], load: dict) -> dict[str, Any]:
    """Fit seconds of crd-fast's torch paths and PatchCore on the training set, one after the other."""
    from crd_fast.benchmark.machine import machine_info

    names = [n for n in owner if (n.startswith("crd") and not n.startswith("crd-onnx")) or n.endswith("patchcore")]
    fit_s, backbone_s, clock = {}, {}, {}
    capped = {}
    for name in names:
        load[f"before_fit {name}"] = os.getloadavg()
        clock[name] = time.strftime("%H:%M:%S", time.gmtime())
        steps = args.coreset_steps if name.endswith("patchcore") else 0
        answer = owner[name].ask("fit", name, steps)
        fit_s[name] = answer["s"]
        if steps:  # the capped fit's measured time plus the steps it did not take
            capped = answer["out"]
            capped["measured_s"] = answer["s"]
            fit_s[name] = answer["s"] + capped["seconds_per_step"] * (capped["steps_total"] - capped["steps_timed"])
    load["after_fits"] = os.getloadavg()
    for name in names:
        backbone_s[name] = owner[name].ask("backbone", name)["out"]
    crd = [n for n in names if n.startswith("crd")]
    best = min(crd, key=fit_s.get)
    result = {
        "command": "python bench/experiments/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "sizes": {"train": args.train, "batch": BATCH, "crop": CROP},
        "fit_s": fit_s,
        "patchcore_coreset_capped": capped or None,
        "fit_started_utc": clock,
        "backbone_on_train_s": backbone_s,
        "fit_minus_backbone_s": {n: fit_s[n] - backbone_s[n] for n in names},
        "load_average_1_5_15min": load,
        "fit_ratio_vs_patchcore": {n: fit_s["anomalib-patchcore"] / fit_s[n] for n in crd},
        "fit_own_part_ratio_vs_patchcore": (fit_s["anomalib-patchcore"] - backbone_s["anomalib-patchcore"])
        / max(1e-9, fit_s[best] - backbone_s[best]),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--anomalib-python",
        help="the interpreter of an environment with anomalib 2.7 (e.g. ANOMALIB_VENV/bin/python); required",
    )
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "crd_bench_peers.json"))
    ap.add_argument(
        "--fit-only",
        action="store_true",
        help="only the fit comparison: crd-fast's torch paths and PatchCore fitted (and their backbones timed), "
        "no PaDiM, no ONNX, no predict (for the 200-image fit target when the whole run does not fit the time)",
    )
    ap.add_argument(
        "--coreset-steps",
        type=int,
        default=0,
        help="with --fit-only: stop PatchCore's k-center-greedy selection after this many steps and extrapolate "
        "its time from their mean (every step costs the same); 0: run it whole",
    )
    ap.add_argument("--worker", choices=("crd", "anomalib"))
    ap.add_argument("--data")
    ap.add_argument("--weights")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.data, args.weights)
        return {}
    if not args.anomalib_python:
        ap.error("--anomalib-python is required: the interpreter of an environment with anomalib 2.7")
    from crd_fast.benchmark.machine import machine_info
    from crd_fast.core.precision import cpu_flags, resolve_precision
    from crd_fast.metrics.scores import image_auroc

    load: dict[str, tuple[float, ...]] = {}  # os.getloadavg(): the shared machine's load during the run
    with tempfile.TemporaryDirectory(prefix="crd_peers_") as tmp:
        data_dir = Path(tmp)
        labels = _write_data(data_dir, args.train, args.test)
        weights = str(data_dir / "wide_resnet50_2_random_seed0.safetensors")
        workers = {
            "crd": Worker(sys.executable, "crd", tmp, weights),
            "anomalib": Worker(args.anomalib_python, "anomalib", tmp, weights),
        }
        try:
            owner = {name: w for w in workers.values() for name in w.info["ready"]}
            if not args.fit_only:  # below 20 images the defaults fit is crd-bf16's; its predict is the same
                owner = {name: w for name, w in owner.items() if not name.endswith("-defaults")}
            if args.fit_only:
                return _fit_only(args, argv, owner, load)
            load["start"] = os.getloadavg()
            fit_answers = {name: w.ask("fit", name) for name, w in owner.items()}
            fit_s = {name: a["s"] for name, a in fit_answers.items()}
            fit_details = {name: a["out"] for name, a in fit_answers.items() if a["out"]}
            load["after_fit"] = os.getloadavg()
            backbone_s = {name: w.ask("backbone", name)["out"] for name, w in owner.items()}
            times: dict[str, list[float]] = {name: [] for name in owner}
            for name, w in owner.items():
                w.ask("predict", name, 0)  # warm-up
            for r in range(args.rounds):
                for name, w in owner.items():
                    times[name].append(w.ask("predict", name, r)["s"])
            load["after_predict"] = os.getloadavg()
            aurocs = {name: image_auroc(labels, w.ask("score", name)["out"]) for name, w in owner.items()}
        finally:
            for w in workers.values():
                w.close()
    ips = {name: BATCH / min(t) for name, t in times.items()}
    crd = [n for n in ips if n.startswith("crd")]
    crd_torch = [n for n in crd if not n.startswith("crd-onnx")]  # the ONNX "fit" is an export, not a fit
    best_crd = max(crd, key=ips.get)
    best_fit = min(crd_torch, key=fit_s.get)
    result = {
        "command": "python bench/experiments/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni"))),
        "auto": resolve_precision("auto", "cpu").describe(),
        "workers": {k: w.info for k, w in workers.items()},
        "sizes": {
            "train": args.train,
            "test": args.test,
            "batch": BATCH,
            "crop": CROP,
            "rounds": args.rounds,
            "padim_features": PADIM_FEATURES,
        },
        "predict_images_per_s_best": ips,
        "predict_images_per_s_median": {n: BATCH / float(np.median(t)) for n, t in times.items()},
        "fit_s": fit_s,
        "fit_details": fit_details,
        "backbone_on_train_s": backbone_s,
        "fit_minus_backbone_s": {n: fit_s[n] - backbone_s[n] for n in fit_s if backbone_s[n] is not None},
        "load_average_1_5_15min": load,
        "image_auroc_random_weights": aurocs,
        "fastest_crd": best_crd,
        "predict_ratio_vs_padim": {n: ips[n] / ips["anomalib-padim"] for n in crd},
        "predict_ratio_vs_patchcore": {n: ips[n] / ips["anomalib-patchcore"] for n in crd},
        "fastest_crd_fit": best_fit,
        "fit_ratio_vs_patchcore": {n: fit_s["anomalib-patchcore"] / fit_s[n] for n in crd_torch},
        "fit_own_part_ratio_vs_patchcore": (
            (fit_s["anomalib-patchcore"] - backbone_s["anomalib-patchcore"])
            / max(1e-9, fit_s[best_fit] - backbone_s[best_fit])
        ),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
