"""The pseudo-defects embedded and scored batch by batch (crd_fast/selection/held_out.py ``EmbeddedInBatches``)
against the whole grid embedded at once and scored in one call, and the choice made either way."""

import numpy as np
import pytest
import torch

from crd_fast.core.local import LocalCRDModel
from crd_fast.core.stats import PatchStatistics
from crd_fast.scoring.candidates import GlobalCandidate, LocalCandidate
from crd_fast.selection.choice import choose
from crd_fast.selection.held_out import EmbeddedInBatches, GridsInMemory, HeldOutSet

POSITIONS, DIM, SIDE = 4, 12, 6  # a 2 x 2 patch grid of 12 features from 3 x 6 x 6 inputs
GRID = (1e-4, 3e-3, 0.01, 0.3)


def _embedding(seed: int):
    """A fixed float64 map of (n, 3, S, S) inputs to (n, P, d) grids, image by image (as a backbone is)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(3 * SIDE * SIDE, POSITIONS * DIM, generator=g, dtype=torch.float64) / SIDE
    return lambda x: torch.tanh(x.reshape(x.shape[0], -1).double() @ weights).reshape(-1, POSITIONS, DIM)


def _candidates(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(30, POSITIONS, DIM, generator=g, dtype=torch.float64)
    stats = PatchStatistics(DIM).update(train.reshape(-1, DIM))
    a = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    vectors = torch.linalg.qr(torch.randn(POSITIONS, DIM, 3, generator=g, dtype=torch.float64))[0]
    values = torch.rand(POSITIONS, 3, generator=g, dtype=torch.float64) * 3
    local = LocalCRDModel.build(train.mean(0), a @ a.T / DIM + 0.01 * torch.eye(DIM, dtype=torch.float64), values,
                                vectors, 0.5)  # fmt: skip
    return {"global": GlobalCandidate(stats, center=True), "local": LocalCandidate(local)}


def _inputs(seed: int, *counts: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, SIDE, SIDE, generator=g, dtype=torch.float64) for n in counts]


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("name", ["global", "local"])
def test_batch_by_batch_maps_equal_the_whole_grids(name, batch):
    """Two designs of 5 and 4 images, embedded ``batch`` at a time (never across a design): the same patch scores
    as the whole (9, P, d) grid scored in one call, for lams in any order."""
    embed = _embedding(1)
    inputs = _inputs(2, 5, 4)
    cand = _candidates(3)[name]
    lams = (0.3, 1e-4, 0.01)
    seen = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return embed(x)

    lazy = EmbeddedInBatches(inputs, counted, (POSITIONS, DIM), batch)
    got = lazy.maps(cand, lams)
    whole = cand.maps(embed(torch.cat(inputs)), lams)
    assert len(lazy) == 9 and got.shape == whole.shape == (3, 9, POSITIONS)
    np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-7)
    assert max(seen) <= batch and sum(seen) == 9 and lazy.seconds > 0
    assert seen == [min(batch, n - s) for n in (5, 4) for s in range(0, n, batch)]  # a batch never spans designs


def test_the_choice_is_the_same_with_the_pseudo_defects_embedded_in_batches():
    """choose() on a held-out set whose pseudo-defects are embedded in batches equals it on the same grids in memory:
    the model, lam_rel, every curve and the evidence."""
    embed = _embedding(4)
    clean = embed(_inputs(5, 6)[0]).float()
    inputs = _inputs(6, 6, 6)
    g = torch.Generator().manual_seed(7)
    masks = np.zeros((12, 2, 2), bool)
    masks[np.arange(12), torch.randint(0, 2, (12,), generator=g).numpy(), 1] = True
    designs = {"x4": 6, "like2": 6}
    in_memory = HeldOutSet(clean, embed(torch.cat(inputs)).float(), masks, ["k"] * 12, designs)
    lazy = HeldOutSet(clean, EmbeddedInBatches(inputs, lambda x: embed(x).float(), (POSITIONS, DIM), 4), masks,
                      ["k"] * 12, designs)  # fmt: skip
    assert isinstance(in_memory.pseudo, GridsInMemory)
    a, b = choose(in_memory, GRID, _candidates(8)), choose(lazy, GRID, _candidates(8))
    assert (a.spatial, a.lam_rel) == (b.spatial, b.lam_rel)
    assert a.paired_likelihood == b.paired_likelihood
    for name in a.families:
        fa, fb = a.families[name].to_dict(), b.families[name].to_dict()
        fa.pop("seconds"), fb.pop("seconds")
        assert fa.keys() == fb.keys()
        for key in fa:
            if isinstance(fa[key], list):
                np.testing.assert_allclose(np.array(fa[key], float), np.array(fb[key], float), rtol=1e-6)  # None: nan
            else:
                assert fa[key] == fb[key]
    assert a.evidence.keys() == b.evidence.keys() and a.evidence["pseudo_defects"] == 12
    for key, value in a.evidence.items():
        assert b.evidence[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value)


def test_a_pseudo_defect_grid_of_another_shape_is_named():
    lazy = EmbeddedInBatches(_inputs(9, 3), _embedding(1), (POSITIONS, DIM + 1), 2)
    with pytest.raises(ValueError, match="embed to"):
        lazy.maps(_candidates(3)["global"], [0.01])
    with pytest.raises(ValueError, match="positive number of images"):
        EmbeddedInBatches(_inputs(9, 3), _embedding(1), (POSITIONS, DIM), 0)
