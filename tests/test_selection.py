"""The detector's label-free choice of lam_rel and of the spatial model (lam_rel="auto", spatial="auto").

Small and fast: a seeded random resnet18 on 64 px images (an 8 x 8 patch grid, d = 384).
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from crd_fast import CRDDetector
from crd_fast.choices import DEFAULT_LAM_GRID, DEFAULT_LAM_REL
from crd_fast.core.embedding import patch_grids
from crd_fast.core.lam_selection import SpectralForm, grid_masks, paired_auroc_difference, select_lam
from crd_fast.core.stats import PatchStatistics
from crd_fast.io.model_file import ModelFileError, read_model_file, write_model_file
from crd_fast.selection import choice as sel_choice
from crd_fast.selection import held_out as sel_held
from crd_fast.selection import plan as sel_plan
from crd_fast.synthetic.pseudo import DEFECT_LIKE, PSEUDO_DEFECTS, make_pseudo_defects

PX = 64
BASE = dict(backbone="resnet18", weights="random", resize=PX, crop=PX, batch_size=8)


def aligned_part(rng: np.random.Generator, size: int = PX) -> np.ndarray:
    """An aligned 'part': a fixed layout (dark disc at the centre, bright bar at the top, a graded background)
    with a little noise. What a patch looks like depends on where it is."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([0.3 + 0.4 * xx, 0.5 - 0.2 * yy, 0.4 + 0.2 * xx * yy], axis=-1)
    disc = (yy - 0.55) ** 2 + (xx - 0.5) ** 2 < 0.05
    img[disc] = (0.1, 0.1, 0.15)
    img[4:10, 8:56] = (0.9, 0.85, 0.8)
    img += rng.normal(0.0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def study_pseudo_inputs(x: torch.Tensor, mean, std, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """The pseudo-defects of bench/RESULTS.md's "x4 + like x2" on held-out inputs x (H, 3, S, S), written out:
    on the de-normalised pictures, the held-out pictures as donors, x4 from default_rng(seed) and like2 from
    default_rng([seed, crc32("like2")]); normalised again. Returns (2H, 3, S, S) inputs and (2H, S, S) masks."""
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    pictures = list((x * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    inputs, masks = [], []
    for rng, kinds, strength in (
        (np.random.default_rng(seed), tuple(PSEUDO_DEFECTS), 4.0),
        (np.random.default_rng([seed, zlib.crc32(b"like2")]), tuple(DEFECT_LIKE), 2.0),
    ):
        painted, painted_masks, _ = make_pseudo_defects(rng, pictures, pictures, kinds=kinds, strength=strength)
        # contiguous, as the detector embeds them (a channels_last input takes other float32 convolution paths)
        inputs.append(((torch.from_numpy(np.stack(painted)).permute(0, 3, 1, 2) - m) / s).contiguous())
        masks.append(np.stack(painted_masks))
    return torch.cat(inputs), np.concatenate(masks)


def settled_reference(image_scores, labels: np.ndarray, window, default) -> float:
    """The lam_rel rule from its definition: the window's best image AUROC (ties to the smaller lam_rel) replaces
    the default if better by > 1 paired standard error, then the first lam_rel of the window within one standard
    error of the best."""
    from sklearn.metrics import roc_auc_score

    auroc = [roc_auc_score(labels, image_scores(lam)) for lam in window]
    best = min(g for g, a in zip(window, auroc) if a >= max(auroc) - 1e-9)
    if paired_auroc_difference(image_scores(best), image_scores(default), labels)["z"] <= 1 or best == default:
        return default
    for lam in window:
        step = paired_auroc_difference(image_scores(best), image_scores(lam), labels)
        if step["difference"] <= step["standard_error"]:
            return lam
    raise AssertionError("the best is within 0 standard errors of itself")


@pytest.fixture(scope="module")
def parts() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [aligned_part(rng) for _ in range(30)]


@pytest.fixture(scope="module")
def global_auto(parts) -> CRDDetector:
    return CRDDetector(**BASE, spatial="global").fit(parts, progress=False)


# ---- the held-out plan ----------------------------------------------------------------------------------
def test_held_out_plan_is_evenly_spaced_when_the_count_is_known():
    for n in (20, 24, 57, 100, 1000):
        plan = sel_plan.HeldOutPlan(n)
        held = [i for i in range(n) if plan.take(i)]
        assert len(held) == plan.held == max(4, min(24, n // 5))
        gaps = np.diff(held)
        assert gaps.min() >= n // len(held) - 1 and gaps.max() <= n // len(held) + 1


def test_held_out_plan_holds_every_eighth_image_of_an_unknown_stream():
    plan = sel_plan.HeldOutPlan(None)
    held = [i for i in range(400) if plan.take(i)]
    assert held == list(range(7, 8 * 24, 8))  # up to 24


def test_held_out_plan_holds_nothing_below_twenty_images():
    plan = sel_plan.HeldOutPlan(19)
    assert not any(plan.take(i) for i in range(19))
    assert "19 training images" in sel_plan.fallback_reason(19, 0)
    assert "3 images held out" in sel_plan.fallback_reason(26, 3)
    assert sel_plan.fallback_reason(20, 4) is None


def test_pseudo_defects_are_made_on_the_denormalised_picture_and_normalised_again():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rng = np.random.default_rng(1)
    pictures = torch.from_numpy(rng.uniform(0.2, 0.8, (5, 3, 48, 48)).astype(np.float32))
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    clean = (pictures - m) / s
    pseudo, masks, kinds = sel_held.pseudo_defect_batch(clean, mean, std, seed=3)
    assert pseudo.shape == clean.shape and masks.shape == (5, 48, 48) and len(kinds) == 5
    changed = (pseudo * s + m - pictures).abs().amax(dim=1) > 1e-4  # (5, 48, 48)
    assert all(masks[i].any() for i in range(5))
    outside = changed.numpy() & ~masks
    # a pseudo-defect changes its own region (soft edges and blurs reach a few pixels further, nothing more)
    assert outside.sum() < 0.2 * changed.numpy().sum() + 5 * 48
    again, _, _ = sel_held.pseudo_defect_batch(clean, mean, std, seed=3)
    torch.testing.assert_close(again, pseudo, rtol=0, atol=0)  # seeded


# ---- the global family ---------------------------------------------------------------------------------
def test_global_choice_is_select_lams_choice_on_the_rest_fit(parts):
    """Recompute the choice independently: statistics of the non-held images, pseudo-defects, select_lam."""
    det = CRDDetector(**BASE, spatial="global").fit(parts, progress=False)
    record = det.selection.to_dict()
    n = len(parts)
    plan = sel_plan.HeldOutPlan(n)
    held = [i for i in range(n) if plan.take(i)]
    assert record["held_out"] == len(held) == 6 and record["n_images"] == n
    x = torch.stack([det.preprocess(p) for p in parts])
    grids = patch_grids(det.embed(x)).double()
    rest = [i for i in range(n) if i not in held]
    stats = PatchStatistics(det.dim).update(grids[rest].reshape(-1, det.dim))
    form = SpectralForm.from_covariance(stats.covariance(), stats.mean)
    pseudo_x, pixel_masks = study_pseudo_inputs(x[held], det.preprocess.mean, det.preprocess.std, det.seed)
    all_grids = torch.cat([grids[held], patch_grids(det.embed(pseudo_x)).double()])
    masks = np.concatenate([np.zeros((len(held), 8, 8), bool), grid_masks(pixel_masks, (8, 8))])
    labels = np.r_[np.zeros(len(held)), np.ones(2 * len(held))]  # 2H pseudo-defects (x4, like2) against H clean
    z = form.rotate(all_grids)
    family = record["families"]["global"]
    assert record["grid"] == list(DEFAULT_LAM_GRID) and list(record["families"]) == ["global"]
    # the likelihood curve, dense: mean -log N(y; mu, C + lam I) per patch and dimension of the clean held-out
    cov, clean = stats.covariance().double(), grids[held].reshape(-1, det.dim) - stats.mean
    assert len(family["nll"]) == len(DEFAULT_LAM_GRID)
    for lam_rel, got in zip(DEFAULT_LAM_GRID, family["nll"]):
        sigma = cov + lam_rel * torch.trace(cov) / det.dim * torch.eye(det.dim, dtype=torch.float64)
        quad = (clean * torch.linalg.solve(sigma, clean.T).T).sum(1).mean()
        # float32 rotations, float64 sums: within 1e-5 (crd_fast/scoring/candidates.py "Precision")
        assert got == pytest.approx(float(0.5 * (quad + torch.linalg.slogdet(sigma)[1]) / det.dim), rel=1e-5)
    # lam0 minimises it; lam_rel is the default (0.01, >= lam0) unless select_lam's choice at or above lam0 beats it
    lam0 = DEFAULT_LAM_GRID[int(np.argmin(family["nll"]))]
    window = [g for g in DEFAULT_LAM_GRID if g >= lam0]
    assert family["lam0"] == lam0 and family["window"] == window
    in_window = select_lam(lambda lam: form.scores(z, lam).reshape(-1, 8, 8).numpy(), labels, masks, window)
    # the pseudo-defect curves: select_lam's in the window, None elsewhere (not scored there)
    inside = [DEFAULT_LAM_GRID.index(g) for g in window]
    assert all(v is None for i, v in enumerate(family["image_auroc"]) if i not in inside)
    np.testing.assert_allclose([family["image_auroc"][i] for i in inside], in_window.image_auroc, atol=1e-12)
    np.testing.assert_allclose([family["aupro"][i] for i in inside], in_window.aupro, rtol=1e-6)
    # ... in image AUROC by more than one standard error, paired over the held-out images (DeLong)
    default = max(DEFAULT_LAM_REL, lam0)

    def image_scores(lam):
        return form.scores(z, lam).reshape(z.shape[0], -1).amax(1).numpy()

    evidence = paired_auroc_difference(image_scores(in_window.choice), image_scores(default), labels)
    assert record["evidence"]["best"] == in_window.choice and record["evidence"]["default"] == default
    for key in ("auroc_a", "auroc_b", "difference", "standard_error", "z"):
        assert record["evidence"][key] == pytest.approx(evidence[key], rel=1e-9, abs=1e-12), key
    lam = settled_reference(image_scores, labels, window, default)
    assert record["choice"] == {"spatial": "global", "lam_rel": lam}
    assert (lam == default) == (evidence["z"] <= 1) == (record["evidence"]["chosen"] == "default")
    assert ("the pseudo-defects' (x4 + like2 pooled) best" if evidence["z"] > 1 else f"the default {default:g}") in (
        record["reason"]
    )
    # then the model is fitted on every image with that lam_rel
    full = PatchStatistics(det.dim).update(grids.reshape(-1, det.dim))
    torch.testing.assert_close(det.model.scorer.statistics.scatter.cpu(), full.scatter, rtol=1e-9, atol=1e-9)
    assert det.model.scorer.n_samples == n * 64 and det.lam_rel == lam == det.model.scorer.lam_rel
    assert det.spatial_choice == "global"
    assert det.options.lam_rel == "auto" and det.config["lam_rel"] == "auto"


def test_a_fixed_lam_rel_with_spatial_auto_scores_one_point_per_family_and_explicit_options_select_nothing(parts):
    det = CRDDetector(**BASE, lam_rel=0.003, spatial="global").fit(parts, progress=False)
    assert det.selection is None and det.lam_rel == 0.003 and det.spatial_choice == "global"


def test_fewer_than_twenty_images_fit_the_defaults_exactly_as_explicit_options(parts):
    auto = CRDDetector(**BASE).fit(parts[:12], progress=False)
    explicit = CRDDetector(**BASE, lam_rel=DEFAULT_LAM_REL, spatial="global").fit(parts[:12], progress=False)
    record = auto.selection.to_dict()
    assert record["choice"] == {"spatial": "global", "lam_rel": DEFAULT_LAM_REL} and record["held_out"] == 0
    assert "only 12 training images" in record["reason"] and record["grid"] == []
    assert auto.spatial_choice == "global" and auto.lam_rel == DEFAULT_LAM_REL
    a = auto.predict(parts[:3], progress=False)
    b = explicit.predict(parts[:3], progress=False)
    torch.testing.assert_close(torch.from_numpy(a.patch_maps), torch.from_numpy(b.patch_maps), rtol=0, atol=0)


def test_an_unknown_number_of_images_holds_out_every_eighth(parts):
    det = CRDDetector(**BASE, spatial="global").fit(iter(parts), progress=False)  # a generator: no count
    assert det.selection.held_out == 3 and "3 images held out" in det.selection.reason()
    assert det.n_images == len(parts) and det.model.n_patches == len(parts) * 64
    det = CRDDetector(**BASE, spatial="global").fit(iter(parts + parts[:10]), progress=False)
    assert det.selection.held_out == 5 and det.selection.grid == list(DEFAULT_LAM_GRID)


def test_without_evidence_lam_rel_is_the_default_not_below_lam0():
    """Pure noise: no lam ranks the pseudo-defects clearly better than the default: 0.01, or lam0 above it."""
    rng = np.random.default_rng(5)
    noise = [(rng.random((PX, PX, 3)) * 255).astype(np.uint8) for _ in range(30)]
    det = CRDDetector(**BASE).fit(noise, progress=False)
    record = det.selection.to_dict()
    chosen = record["families"][record["choice"]["spatial"]]
    evidence = record["evidence"]
    assert evidence["z"] <= 1 and evidence["default"] == record["choice"]["lam_rel"]
    assert evidence["auroc_a"] == chosen["window_best_auroc"] == max(v for v in chosen["image_auroc"] if v is not None)
    assert "the default" in record["reason"] and "did not beat it" in record["reason"]
    lam0 = chosen["lam0"]
    assert lam0 == DEFAULT_LAM_GRID[int(np.argmin(chosen["nll"]))] and len(record["families"]) == 2
    assert record["choice"]["lam_rel"] == max(DEFAULT_LAM_REL, lam0) == det.lam_rel
    # local only where its held-out likelihood is better by more than two standard errors
    paired = record["paired_likelihood"]
    assert det.spatial_choice == ("local" if paired["t"] < -2 else "global")


def test_the_lam_window_and_the_paired_comparison():
    grid = DEFAULT_LAM_GRID
    assert sel_choice.lam_window(grid, 1e-5) == list(grid)
    assert sel_choice.lam_window(grid, 3e-3) == [3e-3, 1e-2, 3e-2, 0.1]
    assert sel_choice.lam_window(grid, 0.1) == [0.1]
    assert sel_choice.lam_window((0.003, 0.01), 0.001) == [0.003, 0.01]  # lam0 itself need not be in the grid
    assert sel_choice.lam_window(grid, 3e-3 * (1 - 1e-12)) == [3e-3, 1e-2, 3e-2, 0.1]  # lam0 rounded a hair below
    assert (
        sel_choice.no_evidence_lam(grid, 1e-5) == DEFAULT_LAM_REL == 0.01
        and sel_choice.no_evidence_lam(grid, 0.03) == 0.03
    )
    assert sel_choice.no_evidence_lam((0.003,), 0.1) == 0.003  # a fixed lam_rel stays
    diff = np.array([-0.3, -0.1, -0.2, -0.2])
    paired = sel_choice.paired_comparison(diff + 1.0, np.ones(4))
    se = diff.std(ddof=1) / 2.0
    assert paired["mean_difference"] == pytest.approx(-0.2) and paired["standard_error"] == pytest.approx(se)
    assert paired["t"] == pytest.approx(-0.2 / se)
    assert sel_choice.paired_comparison(np.zeros(3), np.ones(3))["t"] == -np.inf  # always better by the same amount


def test_online_update_keeps_the_choice(global_auto, parts):
    det = CRDDetector(**BASE, spatial="global").fit(parts, progress=False)
    lam, record = det.lam_rel, det.selection.to_dict()
    det.partial_fit(parts[:5], progress=False)
    assert det.lam_rel == lam and det.selection.to_dict() == record and det.n_images == len(parts) + 5
    assert det.model.n_patches == (len(parts) + 5) * 64


def test_global_auto_save_load_gives_identical_scores_and_the_record(global_auto, parts, tmp_path):
    path = tmp_path / "auto.crd"
    global_auto.save(path)
    _, meta = read_model_file(path, "crd_detector")
    assert meta["config"]["lam_rel"] == "auto" and meta["lam_rel"] == global_auto.lam_rel
    assert meta["spatial_choice"] == "global" and meta["selection"] == json.loads(
        json.dumps(global_auto.selection.to_dict())
    )
    loaded = CRDDetector.load(path)
    assert loaded.lam_rel == global_auto.lam_rel and loaded.spatial_choice == "global"
    assert loaded.selection.to_dict() == meta["selection"] and not loaded.selection_pending
    a = global_auto.predict(parts[:4], progress=False)
    b = loaded.predict(parts[:4], progress=False)
    for key in ("image_scores", "anomaly_maps", "patch_maps"):
        torch.testing.assert_close(torch.from_numpy(getattr(b, key)), torch.from_numpy(getattr(a, key)), rtol=0, atol=0)
    with pytest.raises(ModelFileError, match="lam_rel='auto'"):
        CRDDetector.load(path, lam_rel=global_auto.lam_rel)  # the file was asked to choose


def _rewrite(path, tmp_path, name, edit_meta=None, edit_tensors=None):
    tensors, meta = read_model_file(path, "crd_detector")
    meta = {
        k: v for k, v in meta.items() if k not in ("format", "format_version", "crd_fast_version", "kind", "checksum")
    }
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    out = tmp_path / name
    write_model_file(out, "crd_detector", tensors, meta, check=None)  # edited on purpose: no load-time check
    return out


def test_a_file_claiming_a_local_model_without_one_is_refused(global_auto, tmp_path):
    global_auto.save(tmp_path / "g.crd")

    def claim_local(meta):
        meta["config"]["spatial"] = "auto"
        meta["spatial_choice"] = "local"

    bad = _rewrite(tmp_path / "g.crd", tmp_path, "claims.crd", claim_local)
    with pytest.raises(ModelFileError, match="spatial 'local' but holds no local model"):
        CRDDetector.load(bad)

    def odd(meta):
        meta["spatial_choice"] = "regional"

    with pytest.raises(ModelFileError, match="spatial_choice='regional'"):
        CRDDetector.load(_rewrite(tmp_path / "g.crd", tmp_path, "odd.crd", odd))

    def fixed_global(meta):
        meta["config"]["spatial"] = "global"
        meta["spatial_choice"] = "local"

    with pytest.raises(ModelFileError, match="config asks 'global'"):
        CRDDetector.load(_rewrite(tmp_path / "g.crd", tmp_path, "conflict.crd", fixed_global))

    def bad_lam(meta):
        meta["config"]["lam_rel"] = "automatic"

    with pytest.raises(ModelFileError, match="lam_rel='automatic' is not a positive number or 'auto'"):
        CRDDetector.load(_rewrite(tmp_path / "g.crd", tmp_path, "lam.crd", bad_lam))


def test_distributed_fit_names_the_unsupported_choice(parts):
    from crd_fast.distributed.detector import fit_detector_distributed

    with pytest.raises(ValueError, match="lam_rel='auto', spatial='auto'"):
        fit_detector_distributed(CRDDetector(**BASE), parts)
    det = CRDDetector(**BASE, lam_rel=0.01, spatial="global")
    fit_detector_distributed(det, parts)  # explicit global options: as before
    assert det.is_fitted and det.selection is None


# ---- command line and report ----------------------------------------------------------------------------
def test_fit_command_prints_the_choice_and_the_report_shows_it(parts, tmp_path, capsys):
    from PIL import Image

    from crd_fast.cli.main import main
    from crd_fast.report import CategoryResult, write_report

    folder = tmp_path / "good"
    folder.mkdir()
    for i, p in enumerate(parts[:24]):
        Image.fromarray(p).save(folder / f"{i:03d}.png")
    args = ["--backbone", "resnet18", "--weights", "random", "--resize", str(PX), "--crop", str(PX), "--no-progress"]
    assert main(["fit", str(folder), "-o", str(tmp_path / "m.crd"), *args, "--spatial", "global"]) == 0
    out = capsys.readouterr().out
    det = CRDDetector.load(tmp_path / "m.crd")
    lam = det.selection.lam_rel
    assert f"selection:  spatial global, lam_rel {lam:g} (asked: lam_rel auto, spatial global)" in out
    assert "4 of 24 images held out with pseudo-defects" in out and f"{lam:>8g} |" in out and "*" in out
    assert main(["fit", str(folder), "-o", str(tmp_path / "x.crd"), *args, "--lam-rel", "automatic"]) == 2
    assert "expected a positive finite number or 'auto', got 'automatic'" in capsys.readouterr().err
    assert main(["fit", str(folder), "-o", str(tmp_path / "x.crd"), *args, "--spatial", "position"]) == 2

    labels = np.r_[np.zeros(3), np.ones(3)]
    result = CategoryResult("part", labels, np.arange(6.0), selection=det.selection.to_dict())
    report = write_report(tmp_path / "report", [result])
    page = report.html_path.read_text()
    assert "Label-free choice of the model" in page and f"<b>{lam:g}</b>" in page
    assert page.count('<tr><td class="l">') >= len(DEFAULT_LAM_GRID)
    assert report.data["categories"][0]["selection"] == json.loads(json.dumps(det.selection.to_dict()))


# ---- the local family ----------------------------------------------------------------------------------
S128 = dict(backbone="resnet18", weights="random", resize=128, crop=128, batch_size=8, layers=("layer2",))


@pytest.fixture(scope="module")
def template_parts() -> list[np.ndarray]:
    """An aligned part with detailed structure that differs from place to place (a fixed smooth random pattern),
    identical in every image up to a little noise: position matters (grid 16 x 16 > d = 128)."""
    from scipy import ndimage

    template = ndimage.gaussian_filter(np.random.default_rng(123).uniform(0, 1, (128, 128, 3)), (1.0, 1.0, 0))
    template = (template - template.min()) / (template.max() - template.min())
    rng = np.random.default_rng(0)
    return [(np.clip(template + rng.normal(0, 0.03, template.shape), 0, 1) * 255).astype(np.uint8) for _ in range(40)]


@pytest.fixture(scope="module")
def local_fixed(parts) -> CRDDetector:
    return CRDDetector(**BASE, lam_rel=0.01, spatial="local").fit(parts, progress=False)


def test_aligned_parts_choose_the_local_model_and_its_curve_is_the_rest_fits(template_parts):
    from crd_fast.scorers.local import LocalCRDScorer

    det = CRDDetector(**S128).fit(template_parts, progress=False)
    record = det.selection.to_dict()
    families = record["families"]
    assert list(families) == ["global", "local"] and record["held_out"] == 8
    assert min(families["local"]["nll"]) < min(families["global"]["nll"])  # local describes held-out parts better
    assert record["paired_likelihood"]["t"] < -2  # by more than two standard errors over the 8 held-out images
    assert det.spatial_choice == "local" and record["choice"] == {"spatial": "local", "lam_rel": det.lam_rel}
    assert det.lam_rel == families["local"]["lam_rel"] == det.model.scorer.lam_rel
    assert det.lam_rel in families["local"]["window"] or det.lam_rel == max(DEFAULT_LAM_REL, families["local"]["lam0"])
    assert isinstance(det.model.scorer, LocalCRDScorer) and det.model.scorer.n_images == 40
    assert det.model.derive("global").scorer.n_samples == 40 * 256  # the pooled global CRD of the same images
    # the local curve, recomputed: a LocalCRDScorer on the non-held images scoring clean + pseudo-defect grids
    plan = sel_plan.HeldOutPlan(40)
    held = [i for i in range(40) if plan.take(i)]
    rest = [i for i in range(40) if i not in held]
    x = torch.stack([det.preprocess(p) for p in template_parts])
    grids = patch_grids(det.embed(x))
    model = LocalCRDScorer(0.01, 0.5, 32).fit(grids[rest]).model()
    pseudo_x, pixel_masks = study_pseudo_inputs(x[held], det.preprocess.mean, det.preprocess.std, det.seed)
    both = torch.cat([grids[held], patch_grids(det.embed(pseudo_x))]).double()
    masks = np.concatenate([np.zeros((8, 16, 16), bool), grid_masks(pixel_masks, (16, 16))])
    labels = np.r_[np.zeros(8), np.ones(16)]
    window = families["local"]["window"]
    expected = select_lam(lambda lam: model.scores(both, lam).reshape(-1, 16, 16).numpy(), labels, masks, window)
    inside = [DEFAULT_LAM_GRID.index(g) for g in window]
    np.testing.assert_allclose([families["local"]["curve"][i] for i in inside], expected.curve, atol=1e-9)
    assert all(v is None for v in families["global"]["curve"])  # the family not chosen: likelihood only
    # the likelihood curve, dense: S_p = U (a diag(s) + S~_p S~_p^T) U^T per position, slogdet and solve
    a, u, s, sv = model.shrinkage, model.eigenvectors, model.eigenvalues, model.scaled_vectors
    cov = u @ (a * torch.diag_embed(s) + sv @ sv.transpose(1, 2)) @ u.T  # (P, d, d)
    r = (grids[held].double() - model.means).transpose(0, 1)  # (P, 8, d)
    eye = torch.eye(model.dim, dtype=torch.float64)
    for i in (0, 4, 8):
        sigma = cov + model.lam(DEFAULT_LAM_GRID[i]) * eye
        quad = (r * torch.linalg.solve(sigma, r.transpose(1, 2)).transpose(1, 2)).sum(-1).mean()
        dense = float(0.5 * (quad + torch.linalg.slogdet(sigma)[1].mean()) / model.dim)
        assert families["local"]["nll"][i] == pytest.approx(dense, rel=1e-5)  # float32 rotations (as above)


def test_local_detector_predicts_the_float64_local_model_of_its_embeddings(local_fixed, parts):
    det = local_fixed
    assert det.selection is None and det.spatial_choice == "local" and det.lam_rel == 0.01
    result = det.predict(parts[:5], progress=False)
    x = torch.stack([det.preprocess(p) for p in parts[:5]])
    grids = patch_grids(det.embed(x)).double()
    expected = det.model.scorer.model().scores(grids, 0.01).reshape(5, 8, 8).numpy()
    np.testing.assert_allclose(result.patch_maps, expected, rtol=2e-4, atol=2e-4 * expected.max())
    np.testing.assert_allclose(result.image_scores, expected.reshape(5, -1).max(1), rtol=2e-4)
    # and it is not the global CRD of the same images
    global_maps = det.model.derive("global").scorer.score(grids.reshape(-1, det.dim)).reshape(5, 8, 8).numpy()
    assert not np.allclose(global_maps, expected, rtol=0.05)


def test_local_save_load_gives_identical_scores(local_fixed, template_parts, parts, tmp_path):
    auto = CRDDetector(**S128).fit(template_parts, progress=False)
    for det, images, name in ((local_fixed, parts[:4], "fixed.crd"), (auto, template_parts[:4], "auto.crd")):
        det.calibrate(images, q=0.9, progress=False)
        det.save(tmp_path / name)
        loaded = CRDDetector.load(tmp_path / name)
        assert loaded.spatial_choice == "local" and loaded.lam_rel == det.lam_rel
        assert loaded.selection == det.selection  # the same record (its dict form round-trips through the file)
        assert loaded.options == det.options and loaded.threshold == det.threshold
        a, b = det.predict(images, progress=False), loaded.predict(images, progress=False)
        for key in ("image_scores", "anomaly_maps", "patch_maps", "normalized_scores"):
            got, want = torch.from_numpy(getattr(b, key)), torch.from_numpy(getattr(a, key))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        np.testing.assert_array_equal(a.labels, b.labels)
    _, meta = read_model_file(tmp_path / "auto.crd", "crd_detector")
    assert meta["config"]["lam_rel"] == "auto" and meta["config"]["spatial"] == "auto"
    assert meta["spatial_choice"] == "local" and meta["lam_rel"] == auto.lam_rel and "local" in meta


def test_a_local_file_with_broken_local_tensors_is_refused(local_fixed, tmp_path):
    local_fixed.save(tmp_path / "l.crd")

    def drop_local(tensors):
        for name in [n for n in tensors if n.startswith("local.")]:
            del tensors[name]

    with pytest.raises(ModelFileError, match="spatial 'local' but holds no local model"):
        CRDDetector.load(_rewrite(tmp_path / "l.crd", tmp_path, "none.crd", edit_tensors=drop_local))

    def short_means(tensors):
        tensors["local.means"] = tensors["local.means"][:-1].clone()

    with pytest.raises(ModelFileError, match="l?ocal|means|shape"):
        CRDDetector.load(_rewrite(tmp_path / "l.crd", tmp_path, "short.crd", edit_tensors=short_means))

    def now_global(meta):
        meta["config"]["spatial"] = "auto"
        meta["spatial_choice"] = "global"

    with pytest.raises(ModelFileError, match="global model file holds tensors of another model"):
        CRDDetector.load(_rewrite(tmp_path / "l.crd", tmp_path, "mixed.crd", now_global))


def test_local_online_update_equals_one_fit_and_keeps_the_choice(template_parts, parts):
    det = CRDDetector(**S128).fit(template_parts[:30], progress=False)
    spatial, lam, record = det.spatial_choice, det.lam_rel, det.selection.to_dict()
    det.partial_fit(template_parts[30:], progress=False)
    assert (det.spatial_choice, det.lam_rel, det.selection.to_dict()) == (spatial, lam, record)
    assert det.model.scorer.n_images == det.n_images == 40 and det.model.n_patches == 40 * 256
    # fewer images than the sketch size: the sketch is exact, so the update equals one fit of all images
    once = CRDDetector(**S128, lam_rel=lam, spatial="local").fit(template_parts, progress=False)
    a = det.predict(template_parts[:3], progress=False).patch_maps
    b = once.predict(template_parts[:3], progress=False).patch_maps
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * b.max())
    assert det.train_score_stats is not None and det.train_score_stats["n"] == 32


def test_tiled_local_detector_fits_all_tiles_in_one_choice(parts):
    from crd_fast.detector.tiling import TiledDetector

    big = [np.concatenate([p, p[:, ::-1]], axis=1) for p in parts[:20]]  # 64 x 128: two tiles each, 40 tiles
    tiled = TiledDetector(CRDDetector(**BASE), tile=64, overlap=0).fit(big, progress=False)
    det = tiled.detector
    # the tiles are one stream of unknown length: every 8th tile is held out
    assert det.n_images == 40 and det.selection.n_images == 40 and det.selection.held_out == 5
    assert det.selection.grid == list(DEFAULT_LAM_GRID) and det.spatial_choice in ("global", "local")
    assert tiled.predict(big[:2], progress=False).anomaly_maps.shape == (2, 64, 128)
    fixed = TiledDetector(CRDDetector(**BASE, lam_rel=0.01, spatial="local"), tile=64, overlap=0)
    fixed.fit(big, progress=False)
    assert fixed.detector.model.scorer.n_images == 40 and fixed.detector.selection is None
    assert fixed.predict(big[:1], progress=False).anomaly_maps.shape == (1, 64, 128)


def test_local_rank_above_the_sketch_is_refused_when_the_detector_is_made():
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, sketch - 1 = 63\\]"):
        CRDDetector(**BASE, local_rank=64)  # spatial "auto": checked when made, not after the fit
