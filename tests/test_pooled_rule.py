"""The label-free rule for lam_rel: x4 + defect-like x2 pseudo-defects pooled, > 1 paired DeLong standard error
over the default, then settled to the smallest lam_rel of the window within one standard error of the best
(bench/RESULTS.md "Choosing lam_rel without labels"; docs/DESIGN.md "The detector's choice of spatial model and
lam_rel").

The references here are written from the definitions, in float64: the image AUROC by sklearn's roc_auc_score and
DeLong's paired variance from the structural components' covariance matrices (DeLong, DeLong and Clarke-Pearson
1988), not from crd_fast's code.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from crd_fast import CRDDetector
from crd_fast.core.lam_selection import paired_auroc_difference, settled_choice
from crd_fast.scoring.candidates import Evaluation
from crd_fast.selection import choice as sel_choice
from crd_fast.selection import held_out as sel_held
from crd_fast.selection.record import SelectionRecord
from crd_fast.synthetic.pseudo import DEFECT_LIKE, PSEUDO_DEFECTS, make_pseudo_defects

WINDOW = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)


# ---- the float64 references ---------------------------------------------------------------------------------
def delong_reference(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """AUROC(a) - AUROC(b) and the standard error of that difference, paired over the same images (DeLong)."""
    labels = np.asarray(labels, bool)
    components = []
    for s in (np.asarray(a, np.float64), np.asarray(b, np.float64)):
        pos, neg = s[labels], s[~labels]
        psi = np.where(pos[:, None] > neg[None, :], 1.0, np.where(pos[:, None] == neg[None, :], 0.5, 0.0))
        components.append((psi.mean(axis=1), psi.mean(axis=0)))  # V10 per positive, V01 per negative
    v10 = np.stack([c[0] for c in components])  # (2, m)
    v01 = np.stack([c[1] for c in components])  # (2, n)
    s10, s01 = np.cov(v10, ddof=1), np.cov(v01, ddof=1)
    contrast = np.array([1.0, -1.0])
    variance = contrast @ s10 @ contrast / v10.shape[1] + contrast @ s01 @ contrast / v01.shape[1]
    difference = roc_auc_score(labels, a) - roc_auc_score(labels, b)
    return float(difference), math.sqrt(max(float(variance), 0.0))


def rule_reference(scores: dict[float, np.ndarray], labels: np.ndarray, window, default) -> dict:
    """The study's rule, written out: the best AUROC of the window (ties to the smaller lam_rel), kept over the
    default only if its paired difference exceeds one standard error, then the first lam_rel of the window whose
    difference from the best is at most one standard error."""
    auroc = {lam: roc_auc_score(labels, scores[lam]) for lam in window}
    top = max(auroc.values())
    best = min(lam for lam in window if auroc[lam] >= top - 1e-9)
    difference, se = delong_reference(scores[best], scores[default], labels)
    z = difference / se if se > 0 else (math.copysign(math.inf, difference) if difference else 0.0)
    out = {"best": best, "difference": difference, "se": se, "z": z, "beats": best != default and z > 1.0}
    out["choice"] = default
    if out["beats"]:
        out["choice"] = best
        for lam in sorted(window):
            d, e = delong_reference(scores[best], scores[lam], labels)
            if lam < best and d <= e:
                out["choice"], out["settled"] = lam, (d, e)
                break
    return out


def implemented(scores: dict[float, np.ndarray], labels: np.ndarray, window, default):
    curve = [roc_auc_score(labels, scores[lam]) for lam in window]
    return settled_choice(
        window, curve, default, lambda a, b: paired_auroc_difference(scores[a], scores[b], labels), 1.0, 1.0
    )


def random_case(rng: np.random.Generator) -> tuple[dict[float, np.ndarray], np.ndarray, float]:
    """H clean and 2H pseudo-defect image scores at each lam of the window: a shared per-image part (the scores of
    one image are strongly correlated over lam), a separation that peaks at a random lam, and noise."""
    h = int(rng.integers(4, 13))
    labels = np.r_[np.zeros(h), np.ones(2 * h)].astype(int)
    base = rng.normal(0.0, 1.0, 3 * h)
    peak = rng.uniform(-4.5, -0.5)
    height = rng.uniform(0.0, 2.0)
    scores = {}
    for lam in WINDOW:
        separation = height * math.exp(-((math.log10(lam) - peak) ** 2))
        scores[lam] = base + separation * labels + rng.normal(0.0, rng.uniform(0.05, 0.6), 3 * h)
        if rng.random() < 0.3:  # coarse scores: ties between images and between lams
            scores[lam] = np.round(scores[lam], 1)
    if rng.random() < 0.4:  # a smaller lam ranks nearly as another: what settling is for
        i, j = sorted(rng.choice(len(WINDOW), 2, replace=False))
        scores[WINDOW[i]] = scores[WINDOW[j]] + rng.normal(0.0, 0.05, 3 * h)
    return scores, labels, float(rng.choice(WINDOW[2:]))


# ---- the rule against the reference --------------------------------------------------------------------------
def test_the_rule_equals_the_float64_reference_on_random_data():
    rng = np.random.default_rng(2024)
    seen = {"default": 0, "best": 0, "settled below the best": 0}
    for _ in range(150):
        scores, labels, default = random_case(rng)
        expected = rule_reference(scores, labels, WINDOW, default)
        got = implemented(scores, labels, WINDOW, default)
        assert got.best == expected["best"] and got.beats == expected["beats"] and got.choice == expected["choice"]
        assert got.evidence["difference"] == pytest.approx(expected["difference"], abs=1e-12)
        assert got.evidence["standard_error"] == pytest.approx(expected["se"], rel=1e-9, abs=1e-12)
        if "settled" in expected:
            assert got.settled["difference"] == pytest.approx(expected["settled"][0], abs=1e-12)
            assert got.settled["standard_error"] == pytest.approx(expected["settled"][1], rel=1e-9, abs=1e-12)
        seen["default" if not got.beats else "best" if got.choice == got.best else "settled below the best"] += 1
    assert min(seen.values()) >= 5, seen  # every branch is exercised


def test_evidence_below_one_standard_error_keeps_the_default():
    labels = np.r_[np.zeros(6), np.ones(12)].astype(int)
    default_scores = np.r_[np.arange(6.0), np.arange(12.0) + 2.0]  # AUROC 0.75
    better = default_scores.copy()
    better[6] = 5.5  # one pseudo-defect moves above one more clean image: a small, noisy gain
    scores = {lam: default_scores for lam in WINDOW}
    scores[1e-3] = better
    expected = rule_reference(scores, labels, WINDOW, 1e-2)
    got = implemented(scores, labels, WINDOW, 1e-2)
    assert got.best == 1e-3 and roc_auc_score(labels, better) > roc_auc_score(labels, default_scores)
    assert 0 < got.evidence["z"] <= 1.0 and not expected["beats"]
    assert not got.beats and got.choice == 1e-2 and got.settled is None


def test_evidence_above_takes_the_best_then_settles_toward_lam0():
    rng = np.random.default_rng(7)
    h = 12
    labels = np.r_[np.zeros(h), np.ones(2 * h)].astype(int)
    base = rng.normal(0, 1, 3 * h)
    noise = lambda: rng.normal(0, 0.05, 3 * h)  # noqa: E731
    best = np.r_[rng.uniform(0, 1, h), rng.uniform(2, 3, 2 * h)]  # perfect ranking
    nearly = best.copy()
    top_two = np.sort(best[:h])[-2:]
    nearly[h] = top_two.mean()  # one pseudo-defect below one clean image: AUROC 1 - 1/(2 h h)
    scores = {
        1e-4: base + noise(),  # no separation
        3e-4: base + 0.2 * labels + noise(),
        1e-3: nearly,  # within one standard error of the best
        3e-3: best,
        1e-2: base + 0.3 * labels + noise(),  # the default: far below
        3e-2: base + 0.2 * labels + noise(),
        0.1: base + 0.1 * labels + noise(),
    }
    assert roc_auc_score(labels, nearly) == pytest.approx(1 - 1 / (2 * h * h)) and roc_auc_score(labels, best) == 1
    expected = rule_reference(scores, labels, WINDOW, 1e-2)
    got = implemented(scores, labels, WINDOW, 1e-2)
    assert got.evidence["z"] > 1 and got.beats
    assert got.best == expected["best"] and got.choice == expected["choice"] == 1e-3 < got.best
    assert got.settled["difference"] <= got.settled["standard_error"]
    # without settling the best itself is taken; with settling at 0 standard errors only an exact tie would move it
    curve = [roc_auc_score(labels, scores[lam]) for lam in WINDOW]
    compare = lambda a, b: paired_auroc_difference(scores[a], scores[b], labels)  # noqa: E731
    assert settled_choice(WINDOW, curve, 1e-2, compare, 1.0, None).choice == got.best
    assert settled_choice(WINDOW, curve, 1e-2, compare, 1.0, 0.0).choice in (got.best, 1e-3)


def test_ties_go_to_the_smaller_lam_rel_and_a_best_equal_to_the_default_keeps_it():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1])
    perfect = labels * 10.0 + np.arange(9)
    poor = np.arange(9.0)[::-1]
    scores = {lam: poor for lam in WINDOW}
    scores[3e-3] = scores[3e-2] = scores[0.1] = perfect
    got = implemented(scores, labels, WINDOW, 1e-2)
    assert got.best == 3e-3 and got.beats and got.choice == rule_reference(scores, labels, WINDOW, 1e-2)["choice"]
    assert got.choice <= 3e-3
    # every lam alike: the best is the smallest, and it only replaces the default on evidence
    flat = {lam: perfect for lam in WINDOW}
    got = implemented(flat, labels, WINDOW, 1e-2)
    assert got.best == WINDOW[0] and not got.beats and got.choice == 1e-2 and got.evidence["z"] == 0.0
    got = implemented(flat, labels, WINDOW[4:], 1e-2)  # the best is the default itself
    assert got.best == got.choice == 1e-2 and not got.beats


def test_the_studys_rule_is_the_same_rule():
    """bench/experiments/lam_criteria_rules.py's "x4 + like2 pooled, 1 fold, 1 SE, settle" on one fold equals the
    reference: the study and the detector share settled_choice and paired_auroc_difference."""
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bench" / "experiments"
    assert (folder / "lam_criteria_rules.py").is_file(), f"the study's rules are missing from {folder}"
    sys.path.insert(0, str(folder))
    try:
        import lam_criteria_rules as lr
    finally:
        sys.path.remove(str(folder))
    grid = (1e-5, 1e-4, 1e-3, 1e-2, 0.1)
    rng = np.random.default_rng(5)
    outcomes = set()
    for _ in range(40):
        scores, labels, _ = random_case(rng)
        by_grid = {g: scores[w] for g, w in zip(grid, WINDOW[2:])}
        lam0 = int(rng.integers(0, len(grid)))
        fold = {"nll_global": np.tile((np.arange(len(grid)) - lam0) ** 2.0, (int((labels == 0).sum()), 1))}
        h = fold["nll_global"].shape[0]
        fold["clean_global"] = np.stack([by_grid[g][:h] for g in grid], axis=1)[:, None, :]  # (H, P=1, L)
        fold["pseudo_x4_global"] = np.stack([by_grid[g][h : 2 * h] for g in grid], axis=1)
        fold["pseudo_like2_global"] = np.stack([by_grid[g][2 * h :] for g in grid], axis=1)
        fold["kinds_x4"] = fold["kinds_like2"] = np.array(["k"] * h)
        rec = lr.Record("b", "s", grid, np.zeros(2), {}, np.zeros(2), [fold])
        got = lr.pseudo_rule(("x4", "like2"), 1, 1.0, settle=1.0)(rec, "global").lam
        default = max(0.01, grid[lam0])
        expected = rule_reference(by_grid, labels, list(grid[lam0:]), default)
        assert got == expected["choice"]
        outcomes.add("default" if not expected["beats"] else "best" if got == expected["best"] else "settled")
    assert outcomes == {"default", "best", "settled"}


def test_bad_input_is_named():
    compare = lambda a, b: {"difference": 0.0, "standard_error": 0.0, "z": 0.0}  # noqa: E731
    with pytest.raises(ValueError, match="3 lam_rel values but 2 curve values"):
        settled_choice([1e-3, 1e-2, 0.1], [0.5, 0.6], 1e-2, compare)
    with pytest.raises(ValueError, match="increasing order"):
        settled_choice([1e-2, 1e-3], [0.5, 0.6], 1e-2, compare)
    with pytest.raises(ValueError, match="finite"):
        settled_choice([1e-3, 1e-2], [0.5, float("nan")], 1e-2, compare)
    with pytest.raises(ValueError, match="compare gave no"):
        settled_choice([1e-3, 1e-2], [0.6, 0.5], 1e-2, lambda a, b: {"z": 2.0})
    with pytest.raises(ValueError, match="must both match the labels"):
        paired_auroc_difference(np.zeros(6), np.zeros(5), np.r_[np.zeros(2), np.ones(4)])
    clean, pseudo = torch.zeros(3, 4, 2), torch.zeros(6, 4, 2)
    with pytest.raises(ValueError, match="6 pseudo-defect grids but 3 masks"):
        sel_held.HeldOutSet(clean, pseudo, np.zeros((3, 2, 2), bool), [])
    with pytest.raises(ValueError, match="do not add up"):
        sel_held.HeldOutSet(clean, pseudo, np.zeros((6, 2, 2), bool), [], {"x4": 3, "like2": 2})
    with pytest.raises(ValueError, match="differ in positions or dimension"):
        sel_held.HeldOutSet(clean, torch.zeros(6, 4, 3), np.zeros((6, 2, 2), bool), [])


# ---- choose(): the window at or above lam0, 2H against H ---------------------------------------------------
class TableCandidate:
    """A candidate whose likelihood is least at ``lam0`` and whose patch scores are a table: image i (its grid's
    first feature holds i) scores table[lam][i] at every patch."""

    def __init__(self, table: dict[float, np.ndarray], lam0: float) -> None:
        self.table, self.lam0 = table, lam0

    def _maps(self, grids: torch.Tensor, lams) -> np.ndarray:
        ids = grids[:, 0, 0].long().numpy()
        return np.stack([np.repeat(self.table[lam][ids][:, None], grids.shape[1], 1) for lam in lams]).astype(
            np.float32
        )

    def evaluate(self, grids: torch.Tensor, lam_grid) -> Evaluation:
        nll = np.array([[(math.log10(lam) - math.log10(self.lam0)) ** 2 + 1.0] * grids.shape[0] for lam in lam_grid])
        return Evaluation(nll + np.arange(grids.shape[0])[None, :] * 1e-3, self._maps(grids, lam_grid))

    def maps(self, grids: torch.Tensor, lams) -> np.ndarray:
        return self._maps(grids, lams)


def table_held_out(h: int) -> sel_held.HeldOutSet:
    grids = torch.arange(3 * h, dtype=torch.float32)[:, None, None].expand(3 * h, 4, 2).contiguous()
    masks = np.zeros((2 * h, 2, 2), bool)
    masks[:, 0, 0] = True
    return sel_held.HeldOutSet(grids[:h], grids[h:], masks, ["k"] * 2 * h, {"x4": h, "like2": h})


def test_choose_searches_only_the_window_at_or_above_lam0_and_ranks_2h_against_h():
    grid = (1e-5, 1e-4, 1e-3, 1e-2, 0.1)
    h = 8
    labels = np.r_[np.zeros(h), np.ones(2 * h)].astype(int)
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, 3 * h)
    table = {
        1e-5: base + 9.0 * labels,  # perfect, but below lam0: never searched
        1e-4: base + 0.2 * labels + rng.normal(0, 0.05, 3 * h),  # lam0
        1e-3: base + 2.0 * labels + rng.normal(0, 0.05, 3 * h),
        1e-2: base + 0.3 * labels + rng.normal(0, 0.05, 3 * h),  # the default
        0.1: base + 2.1 * labels + rng.normal(0, 0.05, 3 * h),
    }
    decision = sel_choice.choose(table_held_out(h), grid, {"global": TableCandidate(table, 1e-4)})
    curves = decision.families["global"]
    assert curves.lam0 == 1e-4 and curves.window == [1e-4, 1e-3, 1e-2, 0.1]
    assert curves.image_auroc[0] is None  # below lam0: not scored
    scores = {lam: table[lam].astype(np.float32).astype(np.float64) for lam in grid}
    expected = rule_reference(scores, labels, curves.window, 1e-2)
    for lam in curves.window:
        assert curves.image_auroc[grid.index(lam)] == pytest.approx(roc_auc_score(labels, scores[lam]), abs=1e-12)
    ev = decision.evidence
    assert ev["pseudo_defects"] == 2 * h and ev["clean"] == h
    assert ev["best"] == expected["best"] and decision.lam_rel == expected["choice"] != 1e-5
    assert ev["difference"] == pytest.approx(expected["difference"], abs=1e-12)
    assert ev["standard_error"] == pytest.approx(expected["se"], rel=1e-9)
    assert ev["chosen"] == ("best" if expected["beats"] else "default") == "best"
    assert ev["settled"]["lam_rel"] == decision.lam_rel
    if "settled" in expected:
        assert ev["settled"]["difference"] == pytest.approx(expected["settled"][0], abs=1e-12)
        assert ev["settled"]["standard_error"] == pytest.approx(expected["settled"][1], rel=1e-9)


# ---- the record ------------------------------------------------------------------------------------------------
def test_the_criterion_names_both_designs_and_the_rule():
    text = sel_choice.CRITERION
    assert "x4 + like2 pooled" in text and "smallest lam_rel within 1 standard error of it" in text
    names = [(d.name, d.kinds, d.strength) for d in sel_held.PSEUDO_DESIGNS]
    assert names == [("x4", tuple(PSEUDO_DEFECTS), 4.0), ("like2", tuple(DEFECT_LIKE), 2.0)]


def test_both_designs_are_painted_as_the_study_paints_them():
    """x4 as earlier versions (default_rng(seed)), like2 from its own stream [seed, crc32("like2")]; both on the
    de-normalised pictures, the held-out pictures their own donors."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rng = np.random.default_rng(1)
    pictures = rng.uniform(0.2, 0.8, (5, 96, 96, 3)).astype(np.float32)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    clean = (torch.from_numpy(pictures).permute(0, 3, 1, 2) - m) / s
    denormalised = list((clean * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    for design, generator, kinds, strength in (
        (sel_held.PSEUDO_DESIGNS[0], np.random.default_rng(9), PSEUDO_DEFECTS, 4.0),
        (sel_held.PSEUDO_DESIGNS[1], np.random.default_rng([9, zlib.crc32(b"like2")]), DEFECT_LIKE, 2.0),
    ):
        images, masks, names = make_pseudo_defects(
            generator, denormalised, denormalised, kinds=tuple(kinds), strength=strength
        )
        got, got_masks, got_names = sel_held.pseudo_defect_batch(clean, mean, std, 9, design=design)
        expected = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) - m) / s
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        np.testing.assert_array_equal(got_masks, np.stack(masks))
        assert got_names == names
    # the x4 design is what earlier versions painted
    old, _, _ = sel_held.pseudo_defect_batch(clean, mean, std, 9)
    new, _, _ = sel_held.pseudo_defect_batch(clean, mean, std, 9, design=sel_held.PSEUDO_DESIGNS[0])
    torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_a_detector_fit_records_2h_pseudo_defects_and_the_settle_step():
    from test_selection import BASE, aligned_part

    rng = np.random.default_rng(11)
    parts = [aligned_part(rng) for _ in range(25)]
    det = CRDDetector(**BASE, spatial="global").fit(parts, progress=False)
    record = det.selection.to_dict()
    h = record["held_out"]
    assert h == 5
    assert [(d["name"], d["images"]) for d in record["pseudo_designs"]] == [("x4", h), ("like2", h)]
    assert record["evidence"]["pseudo_defects"] == 2 * h and record["evidence"]["clean"] == h
    assert set(record["pseudo_defects"]) <= set(PSEUDO_DEFECTS) | set(DEFECT_LIKE)
    assert set(record["pseudo_defects"]) & set(DEFECT_LIKE) and set(record["pseudo_defects"]) & set(PSEUDO_DEFECTS)
    assert "x4 + like2 pooled" in record["reason"] and record["criterion"] == sel_choice.CRITERION
    ev, window = record["evidence"], record["families"]["global"]["window"]
    assert ev["best"] in window and det.lam_rel in window + [ev["default"]]
    if ev["chosen"] == "best":
        assert ev["settled"]["lam_rel"] == det.lam_rel <= ev["best"]
    else:
        assert "settled" not in ev and det.lam_rel == ev["default"]
    again = SelectionRecord.from_dict(record)
    assert again.to_dict() == record and again.reason() == record["reason"]


def _made_record(evidence: dict, designs: list) -> SelectionRecord:
    from crd_fast.selection.record import FamilyCurves

    curves = FamilyCurves([1.0, 0.9, 1.1], [0.0, 0.0, 0.0], 1e-3, [1e-3, 1e-2, 0.1], lam_rel=evidence["lam"])
    return SelectionRecord(
        {}, "global", evidence["lam"], 30, 6, [1e-3, 1e-2, 0.1], {"global": curves}, None,
        {k: v for k, v in evidence.items() if k != "lam"}, "c", 4.0, ["faint_line"], designs,
    )  # fmt: skip


def test_the_reason_says_the_settle_step_and_older_records_keep_theirs():
    base = {"default": 0.01, "auroc_a": 0.9, "auroc_b": 0.7, "z": 2.5, "deviations_needed": 1.0}
    designs = [{"name": "x4", "images": 6}, {"name": "like2", "images": 6}]
    settled = dict(base, lam=1e-3, best=0.1, chosen="best")
    settled["settled"] = {"lam_rel": 1e-3, "difference": 0.012, "standard_error": 0.02, "deviations": 1.0}
    text = _made_record(settled, designs).reason()
    assert "settled from 0.1" in text and "(x4 + like2 pooled)" in text and "1e-3" not in text
    assert "to the smallest lam_rel of the window within 1 standard error of it (0.001: +0.012" in text
    kept = dict(base, lam=0.1, best=0.1, chosen="best")
    kept["settled"] = {"lam_rel": 0.1, "difference": 0.0, "standard_error": 0.0, "deviations": 1.0}
    assert "no smaller lam_rel of the window is within 1 standard error" in _made_record(kept, designs).reason()
    old = _made_record(dict(base, lam=0.1, best=0.1, chosen="best"), [])  # an earlier version's record
    assert "the pseudo-defects' best in the window" in old.reason() and "settled" not in old.reason()
    as_dict = old.to_dict()
    assert "pseudo_designs" not in as_dict and SelectionRecord.from_dict(as_dict).pseudo_designs == []
    with pytest.raises(ValueError, match="pseudo_designs"):
        SelectionRecord.from_dict(dict(as_dict, pseudo_designs={"x4": 6}))
