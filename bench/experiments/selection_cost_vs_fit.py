"""The defaults' fit (lam_rel="auto", spatial="auto") against a plain global fit: wall time and peak RSS, side by side.

Each fit runs in a fresh child process (so its peak resident set is its own), one after another, alternating, for
several rounds: `CRDDetector(spatial="global", lam_rel=0.01).fit` and `CRDDetector().fit` (the defaults) on the same
generated defect-free images (crd_fast.synthetic; an aligned category such as "cap", where the local model is a real
candidate, and a texture), seeded random backbone weights. A child reports the fit's wall seconds, its peak RSS
(VmHWM of /proc/self/status, the whole process: interpreter, torch, backbone, images and the fit) and the RSS before
the fit. ``--code DIR`` (repeatable) times the crd_fast package found in DIR (a checkout with its compiled modules), so
two versions of the code are timed in one run, alternating with each other as well.

``--profile`` adds one more child per code and category: the defaults' fit with its steps wrapped (forward passes,
statistics and sketch updates of the rest and held-out parts, pseudo-defects, each candidate model's eigh,
per-position eigenpairs and rotation, likelihoods and factors per lam, maps, the final merge). Per step: calls, self
seconds (nested steps subtracted), and memory from RSS sampled every few milliseconds by a thread: the largest rise
over the RSS at the step's entry while it ran (transient) and RSS at exit minus entry (retained). Steps whose
function a version of the code lacks are left out.

    python bench/experiments/selection_cost_vs_fit.py --images 200 --category cap --category fabric --rounds 2 \\
        --profile --out selection_cost_vs_fit.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

OPTIONS = {"global": {"spatial": "global", "lam_rel": 0.01}, "defaults": {}}


# ---- memory -------------------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def rss_mb() -> float:
    """Resident set size now, MB (statm: cheap enough to sample every few ms)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- step profiler ------------------------------------------------------------------------------------------
class StepProfiler:
    """Wraps functions as named steps: self time (nested steps subtracted) and RSS sampled by a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.steps: dict[str, dict[str, float]] = {}
        self._stack: list[list[Any]] = []  # [label, start, child_seconds, rss_enter, rss_max]
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = rss_mb()
            for frame in list(self._stack):
                if now > frame[4]:
                    frame[4] = now
            time.sleep(self._interval)

    def wrap(self, fn: Callable[..., Any], label: Callable[..., str]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = label(*args, **kwargs)
            enter = rss_mb()
            frame = [name, time.perf_counter(), 0.0, enter, enter, time.process_time(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = time.perf_counter() - frame[1]
                cpu = time.process_time() - frame[5]
                leave = rss_mb()
                if self._stack:
                    self._stack[-1][2] += elapsed
                    self._stack[-1][6] += cpu
                    self._stack[-1][4] = max(self._stack[-1][4], frame[4], leave)
                s = self.steps.setdefault(
                    name, {"calls": 0, "self_s": 0.0, "total_s": 0.0, "transient_mb": 0.0, "retained_mb": 0.0}
                )
                s["calls"] += 1
                s["self_s"] += elapsed - frame[2]
                s["self_cpu_s"] = s.get("self_cpu_s", 0.0) + cpu - frame[6]
                s["total_s"] += elapsed
                s["transient_mb"] = max(s["transient_mb"], max(frame[4], leave) - enter)
                s["retained_mb"] += leave - enter

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper


def _inside(profiler: StepProfiler, name: str) -> bool:
    return any(f[0] == name for f in profiler._stack)


def _selector_part(model: Any) -> str:
    selector = _CURRENT.get("selector")
    if selector is None:
        return "plain fit"
    if any(m is model for m in getattr(selector, "held", {}).values()):
        return "held-out part"
    return "rest part"


_CURRENT: dict[str, Any] = {}


def instrument(profiler: StepProfiler) -> list[str]:
    """Wrap the fit's steps (those that exist in this version of the code); returns the wrapped names."""
    import torch

    p = profiler
    pseudo_fwd = "pseudo-defects: forward passes"

    def fixed(text: str) -> Callable[..., str]:
        return lambda *a, **k: text

    def eigh_label(x: Any, *a: Any, **k: Any) -> str:
        if x.ndim == 2:
            return f"eigh {x.shape[0]} x {x.shape[0]} (pooled covariance)"
        return "eigh batched small (per-position Gram / k x k)"

    targets: list[tuple[str, str, Callable[..., str]]] = [
        ("crd_fast.detector.detector", "CRDDetector.fit", fixed("fit (total)")),
        (
            "crd_fast.detector.detector",
            "CRDDetector.embed",
            lambda *a, **k: pseudo_fwd if _inside(p, pseudo_fwd) else "forward passes (stream)",
        ),
        ("crd_fast.detector.detector", "CRDDetector._cpu_grids", fixed(pseudo_fwd)),
        ("crd_fast.selection.selector", "LabelFreeSelector.finish", fixed("selection: finish (total)")),
        ("crd_fast.selection.selector", "LabelFreeSelector.add", fixed("selector: route batch")),
        ("crd_fast.selection.selector", "pseudo_defect_batch", fixed("pseudo-defects: painting")),
        ("crd_fast.selection.selector", "LabelFreeSelector._fitted_on_all", fixed("final merge (rest + held-out)")),
        (
            "crd_fast.scoring.local_crd",
            "LocalCRD.partial_fit",
            lambda self, *a, **k: f"local statistics update: {_selector_part(self)}",
        ),
        (
            "crd_fast.scoring.global_crd",
            "GlobalCRD.partial_fit",
            lambda self, *a, **k: f"global statistics update: {_selector_part(self)}",
        ),
        ("crd_fast.core.stats", "PatchStatistics.update", fixed("pooled statistics (scatter)")),
        ("crd_fast.core.sketch", "FrequentDirections.append", fixed("sketch: append rows")),
        ("crd_fast.core.sketch", "FrequentDirections._shrink", fixed("sketch: shrink")),
        ("crd_fast.core.sketch", "FrequentDirections.merge", fixed("sketch: merge")),
        ("crd_fast.core.local", "LocalStatistics.local_eigenpairs", fixed("local model: per-position eigenpairs")),
        ("crd_fast.core.local", "LocalCRDModel.build", fixed("local model: rotation into C's eigenbasis")),
        ("crd_fast.scorers.local", "LocalCRDScorer.model", fixed("local model: build (other)")),
        ("crd_fast.scoring.candidates", "GlobalCandidate.__init__", fixed("global candidate: build")),
        ("crd_fast.scoring.candidates", "GlobalCandidate.rotate", fixed("global: rotate held-out")),
        ("crd_fast.scoring.candidates", "GlobalCandidate.likelihood", fixed("global: likelihood per lam")),
        ("crd_fast.scoring.candidates", "GlobalCandidate.maps", fixed("global: pseudo-defect maps")),
        ("crd_fast.scoring.candidates", "GlobalCandidate.maps_input", fixed("global: rotate pseudo-defects")),
        ("crd_fast.scoring.candidates", "LocalCandidate.rotate", fixed("local: rotate held-out")),
        ("crd_fast.scoring.candidates", "LocalCandidate.maps_input", fixed("local: rotate pseudo-defects")),
        ("crd_fast.scoring.candidates", "LocalCandidate.factors", fixed("local: Woodbury factors per lam")),
        ("crd_fast.scoring.candidates", "LocalCandidate.likelihood", fixed("local: likelihood per lam")),
        ("crd_fast.scoring.candidates", "LocalCandidate.maps", fixed("local: pseudo-defect maps")),
        (
            "crd_fast.scoring.candidates",
            "GlobalCandidate.evaluate",
            fixed("global: rotate held-out, likelihood and scores, all lam"),
        ),
        (
            "crd_fast.scoring.candidates",
            "LocalCandidate.evaluate",
            fixed("local: rotate held-out, likelihood and scores, all lam"),
        ),
        ("crd_fast.core.local", "_gram_eigenpairs", fixed("local model: per-position eigenpairs")),
        ("crd_fast.core.local", "LocalCRDModel.from_statistics", fixed("local model: rotation into C's eigenbasis")),
        ("crd_fast.selection.choice", "select_lam", fixed("select_lam (AUROC, AUPRO)")),
        ("crd_fast.selection.choice", "paired_auroc_difference", fixed("paired AUROC difference")),
    ]
    wrapped = []
    for module_name, attr, label in targets:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner: Any = module
        parts = attr.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, parts[-1]):
            continue
        setattr(owner, parts[-1], p.wrap(getattr(owner, parts[-1]), label))
        wrapped.append(f"{module_name}.{attr}")
    torch.linalg.eigh = p.wrap(torch.linalg.eigh, eigh_label)
    wrapped.append("torch.linalg.eigh")
    selector_mod = importlib.import_module("crd_fast.selection.selector")
    init = selector_mod.LabelFreeSelector.__init__

    def remember(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        _CURRENT["selector"] = self

    selector_mod.LabelFreeSelector.__init__ = remember
    return wrapped


# ---- child: one fit ----------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> dict[str, Any]:
    if args.code:
        sys.path.insert(0, os.path.abspath(args.code))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import crd_fast
    from crd_fast import CRDDetector
    from crd_fast.metrics import scores as _metrics  # noqa: F401  (a one-off import, in both children alike)
    from crd_fast.synthetic import render_sample

    images = [render_sample(args.category, args.size, 0, None, i, "train")[0] for i in range(args.images)]
    det = CRDDetector(backbone=args.backbone, weights="random", batch_size=args.batch, **OPTIONS[args.option])
    profiler: Optional[StepProfiler] = None
    if args.profile:
        profiler = StepProfiler()
        instrument(profiler)
        profiler.start()
    rss_before = rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    det.fit(images, progress=False)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    out: dict[str, Any] = {
        "code": args.code or os.path.dirname(os.path.dirname(crd_fast.__file__)),
        "option": args.option,
        "category": args.category,
        "images": args.images,
        "fit_s": seconds,
        "fit_cpu_s": cpu_seconds,  # all threads; what the fit computed, whatever else ran on the machine
        "rss_before_mb": rss_before,
        "peak_rss_mb": _status_mb("VmHWM"),
        "spatial": det.spatial_choice,
        "lam_rel": det.lam_rel,
        "d": det.dim,
        "patch_grid": list(det.patch_grid),
        "threads": torch.get_num_threads(),
    }
    if profiler is not None:
        profiler.stop()
        out["steps"] = json.loads(json.dumps(profiler.steps))  # the fit's steps (predict below adds its own)
    if det.selection is not None and det.selection.held_out:
        out["held_out"] = det.selection.held_out
        out["selection_s"] = det.selection.seconds
        out["record"] = det.selection.to_dict()
    if args.test:  # after the timed fit: scores of generated test images, good and defective
        from crd_fast.metrics.scores import image_auroc
        from crd_fast.synthetic import CATEGORIES

        defects = CATEGORIES[args.category].defects
        good = [render_sample(args.category, args.size, 0, None, i, "test")[0] for i in range(args.test)]
        bad = [
            render_sample(args.category, args.size, 0, defects[i % len(defects)], i, "test")[0]
            for i in range(args.test)
        ]
        scores = det.predict(good + bad, progress=False).image_scores
        out["test_scores"] = [float(x) for x in scores]
        out["test_auroc"] = float(image_auroc([0] * args.test + [1] * args.test, scores))
    return out


def run_child(args: argparse.Namespace, code: Optional[str], option: str, category: str, profile: bool) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--option",
        option,
        "--category",
        category,
        "--images",
        str(args.images),
        "--backbone",
        args.backbone,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--test",
        str(args.test),
    ]
    if code:
        cmd += ["--code", code]
    if profile:
        cmd.append("--profile")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {option} {category} {code} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- parent --------------------------------------------------------------------------------------------------
def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    keep = {"Model name": "model", "Flags": "flags", "CPU(s)": "cpus"}
    return {keep[k]: v.strip() for k, v in info.items() if k in keep}


def summarise(runs: list[dict[str, Any]], codes: list[Optional[str]], categories: list[str]) -> list[dict]:
    rows = []
    for code in codes:
        label = code or "installed"
        for category in categories:
            mine = [r for r in runs if r["code_arg"] == code and r["category"] == category and "steps" not in r]
            glob = [r for r in mine if r["option"] == "global"]
            auto = [r for r in mine if r["option"] == "defaults"]
            if not glob or not auto:
                continue
            pairs = [(g, a) for g in glob for a in auto if g["round"] == a["round"]]
            rows.append(
                {
                    "code": label,
                    "category": category,
                    "global_fit_s": statistics.median(r["fit_s"] for r in glob),
                    "defaults_fit_s": statistics.median(r["fit_s"] for r in auto),
                    "time_ratio_median": statistics.median(a["fit_s"] / g["fit_s"] for g, a in pairs),
                    "time_ratios": [round(a["fit_s"] / g["fit_s"], 3) for g, a in pairs],
                    "cpu_time_ratio_median": statistics.median(a["fit_cpu_s"] / g["fit_cpu_s"] for g, a in pairs),
                    "global_peak_mb": statistics.median(r["peak_rss_mb"] for r in glob),
                    "defaults_peak_mb": statistics.median(r["peak_rss_mb"] for r in auto),
                    "peak_ratio_median": statistics.median(a["peak_rss_mb"] / g["peak_rss_mb"] for g, a in pairs),
                    "chosen": sorted({f"{r['spatial']} {r['lam_rel']:g}" for r in auto}),
                    "global_test_auroc": sorted({round(r["test_auroc"], 4) for r in glob if "test_auroc" in r}),
                    "defaults_test_auroc": sorted({round(r["test_auroc"], 4) for r in auto if "test_auroc" in r}),
                }
            )
    return rows


def score_differences(runs: list[dict[str, Any]], codes: list[Optional[str]]) -> list[dict[str, Any]]:
    """Largest relative difference of the test scores between the first code and each other one, per category and
    option (the same images, the same options: how far the codes' fitted models differ where it shows)."""
    out = []
    scored = [r for r in runs if "test_scores" in r and "steps" not in r]
    for code in codes[1:]:
        for r in scored:
            if r["code_arg"] != codes[0]:
                continue
            other = next(
                (
                    o
                    for o in scored
                    if o["code_arg"] == code and (o["category"], o["option"]) == (r["category"], r["option"])
                ),
                None,
            )
            if other is None or any(r[k] != other[k] for k in ("spatial", "lam_rel")):
                continue
            a, b = np.asarray(r["test_scores"]), np.asarray(other["test_scores"])
            out.append(
                {
                    "category": r["category"],
                    "option": r["option"],
                    "codes": [codes[0], code],
                    "max_relative_difference": float(np.max(np.abs(b - a) / np.abs(a))),
                }
            )
    return out


def print_table(rows: list[dict], profiles: list[dict]) -> None:
    print(
        "| code | category | global fit s | defaults fit s | time ratio (median; per round) | CPU time ratio "
        "| global peak MB | defaults peak MB | peak ratio | chosen | test AUROC global; defaults |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(
            f"| {r['code']} | {r['category']} | {r['global_fit_s']:.1f} | {r['defaults_fit_s']:.1f} | "
            f"{r['time_ratio_median']:.2f}x ({', '.join(f'{x:.2f}' for x in r['time_ratios'])}) | "
            f"{r['cpu_time_ratio_median']:.2f}x | "
            f"{r['global_peak_mb']:.0f} | {r['defaults_peak_mb']:.0f} | {r['peak_ratio_median']:.2f}x | "
            f"{'; '.join(r['chosen'])} | {r['global_test_auroc']}; {r['defaults_test_auroc']} |"
        )
    for prof in profiles:
        print(
            f"\nsteps of the {prof['option']} fit: {prof['code_arg'] or 'installed'}, {prof['category']} "
            f"(fit {prof['fit_s']:.1f} s, peak {prof['peak_rss_mb']:.0f} MB, RSS before {prof['rss_before_mb']:.0f} MB)"
        )
        print("| step | calls | self s | self CPU s | total s | transient MB | retained MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, s in sorted(prof["steps"].items(), key=lambda kv: -kv[1]["self_s"]):
            print(
                f"| {name} | {s['calls']} | {s['self_s']:.2f} | {s['self_cpu_s']:.2f} | {s['total_s']:.2f} | "
                f"{s['transient_mb']:.0f} | "
                f"{s['retained_mb']:.0f} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--category", action="append", help="generated category (repeatable; default cap and fabric)")
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--size", type=int, default=256, help="generated image side (resized to 256, cropped to 224)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--code", action="append", help="a checkout whose crd_fast to time (repeatable)")
    p.add_argument("--profile", action="store_true", help="add one profiled defaults' fit per code and category")
    p.add_argument("--out", help="write the runs and the summary as JSON here")
    p.add_argument(
        "--test",
        type=int,
        default=0,
        help="after each (timed) fit, score this many good and as many defective generated test images (untimed): "
        "image AUROC, and the largest relative difference of the scores between the codes",
    )
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--option", choices=sorted(OPTIONS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.category = args.category[0]
        args.code = args.code[0] if args.code else None
        print(json.dumps(child(args)))
        return
    categories = args.category or ["cap", "fabric"]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    codes: list[Optional[str]] = list(args.code) if args.code else [here]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs: list[dict] = []
    for category in categories:
        for rnd in range(args.rounds):
            order = [(c, o) for c in codes for o in ("global", "defaults")]
            if rnd % 2:
                order.reverse()
            for code, option in order:
                r = run_child(args, code, option, category, profile=False)
                r.update(round=rnd, code_arg=code)
                runs.append(r)
                print(
                    f"# round {rnd} {category} {code or 'installed'} {option}: {r['fit_s']:.1f} s, "
                    f"peak {r['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
        if args.profile:
            for code in codes:
                for option in ("global", "defaults"):
                    r = run_child(args, code, option, category, profile=True)
                    r.update(round=None, code_arg=code)
                    runs.append(r)
    rows = summarise(runs, codes, categories)
    profiles = [r for r in runs if "steps" in r]
    print_table(rows, profiles)
    differences = score_differences(runs, codes)
    for diff in differences:
        print(
            f"test scores, {diff['category']} {diff['option']}: largest relative difference between the codes "
            f"{diff['max_relative_difference']:.2e}"
        )
    result = {
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": _lscpu(),
        "load_average_end": os.getloadavg(),
        "summary": rows,
        "score_differences": differences,
        "runs": runs,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
