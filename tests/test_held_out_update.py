"""The selector adds the clean held-out grids to the chosen model's fit before the pseudo-defects are scored
(crd_fast/selection/selector.py): the final model's statistics are bitwise those of the rest's fit updated with the
held-out grids in the order they came, and the record is that of choose() on the full held-out set with candidates
built from the rest's fit."""

import numpy as np
import pytest
import torch

from crd_fast.choices import DEFAULT_LAM_GRID
from crd_fast.scorers.local import LocalCRDScorer
from crd_fast.scoring.global_crd import GlobalCRD
from crd_fast.scoring.local_crd import LocalCRD
from crd_fast.selection.choice import choose
from crd_fast.selection.held_out import PSEUDO_DESIGNS, EmbeddedInBatches, HeldOutSet, pseudo_defect_batch
from crd_fast.selection.plan import HeldOutPlan
from crd_fast.selection.selector import HELD_BATCH, LabelFreeSelector

SIDE, POSITIONS, DIM, BATCH, IMAGES = 64, 16, 10, 8, 44  # a 4 x 4 patch grid of 10 features from 3 x 64 x 64 inputs
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _embedding(seed: int):
    """A fixed map of (n, 3, S, S) inputs to (n, P, d) float32 grids, each patch from its own 16 x 16 pixel block."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(POSITIONS, 3 * 256, DIM, generator=g, dtype=torch.float64) / 16

    def one(x: torch.Tensor) -> torch.Tensor:
        blocks = x.double().reshape(3, 4, 16, 4, 16).permute(1, 3, 0, 2, 4).reshape(POSITIONS, 1, 3 * 256)
        return torch.tanh(blocks @ weights)[:, 0].float()

    def embed(x: torch.Tensor) -> torch.Tensor:
        # image by image, so that any batching gives the same grids, as the backbone of bench/RESULTS.md does on
        # its CPU (the selector embeds the pseudo-defects PSEUDO_BATCH at a time, the reference a batch at a time)
        return torch.stack([one(image) for image in x])

    return embed


def _inputs(seed: int) -> torch.Tensor:
    """Normalised inputs of an aligned picture (a fixed pattern plus noise), as the detector streams them."""
    rng = np.random.default_rng(seed)
    template = rng.uniform(0.2, 0.8, (SIDE, SIDE, 3))
    pictures = np.clip(template + rng.normal(0, 0.08, (IMAGES, SIDE, SIDE, 3)), 0, 1).astype(np.float32)
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2)
    return ((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]).contiguous()


def _templates(names: tuple[str, ...]) -> dict:
    # a sketch of 6 rows: the stream's and the held-out update's Frequent Directions shrinks both happen
    made = {
        "global": GlobalCRD.create({"lam_rel": DEFAULT_LAM_GRID[0], "center": True, "rank": None}),
        "local": LocalCRD(LocalCRDScorer(DEFAULT_LAM_GRID[0], 0.5, 3, sketch=6)),
    }
    return {name: made[name] for name in names}


def _record_fields(families: dict, evidence: dict, paired) -> tuple:
    curves = {}
    for name, family in families.items():
        d = family.to_dict()
        d.pop("seconds")
        curves[name] = d
    return curves, evidence, paired


def _assert_close(a, b, path="record"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12, nan_ok=True), path
    else:
        assert a == b, path


@pytest.mark.parametrize("names", [("global", "local"), ("global",)])
def test_the_final_statistics_and_the_record_are_those_of_the_earlier_order(names):
    embed = _embedding(1)
    x = _inputs(2)
    grids = torch.cat([embed(x[i : i + BATCH]) for i in range(0, IMAGES, BATCH)])  # the stream's batches
    selector = LabelFreeSelector(_templates(names), DEFAULT_LAM_GRID, IMAGES, {"lam_rel": "auto"}, seed=5)
    for start in range(0, IMAGES, BATCH):
        selector.add(x[start : start + BATCH], grids[start : start + BATCH])
    model, record = selector.finish(embed, MEAN, STD, (4, 4), batch=BATCH)

    # the reference, in the earlier order: the rest's fit batch by batch, the candidates built from it, choose() on
    # the clean held-out grids and the pseudo-defects, then the held-out grids added HELD_BATCH images at a time
    plan = HeldOutPlan(IMAGES)
    held = np.array([plan.take(i) for i in range(IMAGES)])
    assert held.sum() == record.held_out >= 4
    templates = _templates(names)
    source = templates[names[-1]]  # the local model's fit gives the global one (derives)
    for start in range(0, IMAGES, BATCH):
        rest = [i for i in range(start, min(start + BATCH, IMAGES)) if not held[i]]
        if rest:
            source.partial_fit(grids[rest])
    candidates = {n: (source if n == names[-1] else source.derive(n)).candidate() for n in names}
    painted, masks, kinds = [], [], []
    for design in PSEUDO_DESIGNS:
        p, m, k = pseudo_defect_batch(x[held], MEAN, STD, 5, design=design)
        painted.append(p), masks.append(m)
        kinds += k
    pseudo = EmbeddedInBatches(painted, embed, (POSITIONS, DIM), BATCH)
    designs = {d.name: int(p.shape[0]) for d, p in zip(PSEUDO_DESIGNS, painted)}
    held_set = HeldOutSet.build(grids[held], pseudo, np.concatenate(masks), kinds, (4, 4), designs)
    expected = choose(held_set, DEFAULT_LAM_GRID, candidates)
    held_grids = grids[held]
    for start in range(0, held_grids.shape[0], HELD_BATCH):  # the held-out images came one per batch
        source.partial_fit(held_grids[start : start + HELD_BATCH])
    full = source if expected.spatial == names[-1] else source.derive(expected.spatial)
    full.set_lam_rel(expected.lam_rel)

    assert (record.spatial, record.lam_rel) == (expected.spatial, expected.lam_rel) == (model.name, model.lam_rel)
    _assert_close(
        _record_fields(expected.families, expected.evidence, expected.paired_likelihood),
        _record_fields(record.families, record.evidence, record.paired_likelihood),
    )
    assert record.evidence["clean"] == held.sum() and record.evidence["pseudo_defects"] == 2 * held.sum()
    got, want = model.state()[0], full.state()[0]
    assert got.keys() == want.keys() and got
    for key in want:
        assert torch.equal(got[key], want[key]), key  # bitwise: the same updates in the same order


@pytest.mark.parametrize("name", ["global", "local"])
def test_a_candidate_is_unchanged_by_later_updates_of_the_fit_it_came_from(name):
    """The selector updates the chosen model's statistics while its candidate still scores the pseudo-defects."""
    embed = _embedding(3)
    grids = embed(_inputs(4))
    model = _templates((name,))[name]
    model.partial_fit(grids[:30])
    cand = model.candidate()
    before = cand.maps(grids[30:], [1e-3, 0.1])
    model.partial_fit(grids[30:38])
    model.partial_fit(grids[38:])
    after = cand.maps(grids[30:], [1e-3, 0.1])
    assert np.array_equal(before, after)
    assert not np.array_equal(before, model.candidate().maps(grids[30:], [1e-3, 0.1]))  # the fit did change


def test_released_clean_grids_are_named_when_read():
    embed = _embedding(1)
    clean = embed(_inputs(2)[:4])
    pseudo = embed(_inputs(3)[:8])
    held = HeldOutSet(clean, pseudo, np.zeros((8, 4, 4), bool), ["k"] * 8)
    held.release_clean()
    assert held.clean is None and held.n_clean == 4 and held.labels.tolist() == [0] * 4 + [1] * 8
    with pytest.raises(ValueError, match="released"):
        held.clean_grids
