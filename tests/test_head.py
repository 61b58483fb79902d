"""CRDHead (float32 torch path) against the float64 reference, AnomalyMapper, InferenceModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import crd_fast.models.head as head_mod
from crd_fast import CRDScorer
from crd_fast.core.embedding import embed_patches, patch_matrix, patchcore_reduce
from crd_fast.features import FeatureExtractor
from crd_fast.models.anomaly_map import AnomalyMapper, gaussian_kernel1d
from crd_fast.models.head import CRDHead, folded_matrix
from crd_fast.models.inference import InferenceModel
from crd_fast.ops import crd_head as fused_op
from crd_fast.ops import reference


def _maps(seed, batch=2, specs=((8, 8, 8), (12, 4, 4))):
    g = torch.Generator().manual_seed(seed)
    # A common offset per channel, as real features have: the head must subtract q = P mu exactly.
    return [torch.randn(batch, c, h, w, generator=g) + torch.randn(1, c, 1, 1, generator=g) for c, h, w in specs]


def _projection(seed, r, d):
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(r, d, generator=g, dtype=torch.float64) / d**0.5
    offset = torch.randn(d, generator=g, dtype=torch.float64)
    return matrix, offset


SPECS = [((8, 8, 8), (12, 4, 4)), ((6, 10, 10), (10, 5, 5), (14, 3, 3)), ((16, 6, 7),)]


@pytest.mark.parametrize("embedding", ["concat", "patchcore"])
@pytest.mark.parametrize("spec_index", range(len(SPECS)))
@pytest.mark.parametrize("full_rank", [True, False])
def test_head_matches_float64_reference(embedding, spec_index, full_rank):
    specs = SPECS[spec_index]
    seed = 100 * spec_index + 10 * full_rank + (embedding == "concat")
    maps = _maps(seed, specs=specs)
    target_dim = 16
    d = sum(c for c, _, _ in specs) if embedding == "concat" else target_dim
    matrix, offset = _projection(seed + 1, d if full_rank else d // 3, d)
    head = CRDHead(matrix, offset, embedding, target_dim, [c for c, _, _ in specs], use_fused=False)
    got = head(maps)
    want = reference.crd_head(maps, matrix, offset, embedding, target_dim)
    assert got.dtype == torch.float32 and got.shape == want.shape == (2, specs[0][1], specs[0][2])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_concat_head_without_layer_channels_splits_by_input():
    maps = _maps(3)
    matrix, offset = _projection(4, 20, 20)
    head = CRDHead(matrix, offset, "concat", use_fused=False)
    torch.testing.assert_close(head(maps).double(), reference.crd_head(maps, matrix, offset), rtol=1e-5, atol=1e-5)


def test_folded_matrix_is_the_composed_linear_map():
    matrix, _ = _projection(5, 16, 16)
    folded = folded_matrix(matrix, [8, 12], "patchcore", 16)
    y = torch.randn(7, 20, dtype=torch.float64)
    torch.testing.assert_close(y @ folded.T, patchcore_reduce(y, [8, 12], 16) @ matrix.T)


def test_head_from_scorer_equals_scorer_scores():
    maps = _maps(6, batch=4)
    emb = embed_patches(maps, "concat")
    scorer = CRDScorer(lam_rel=0.05).fit(patch_matrix(emb))
    head = CRDHead.from_scorer(scorer, "concat", layer_channels=[8, 12], use_fused=False)
    want = scorer.score(patch_matrix(emb).double()).reshape(4, 8, 8)
    torch.testing.assert_close(head(maps).double(), want, rtol=1e-5, atol=1e-5 * float(want.max()))
    assert head.q.dtype == torch.float32
    torch.testing.assert_close(
        head.q.double(), scorer.projection.matrix @ scorer.projection.offset, rtol=1e-6, atol=1e-6
    )


def test_head_input_checks():
    matrix, offset = _projection(7, 16, 16)
    with pytest.raises(ValueError, match="layer_channels"):
        CRDHead(matrix, offset, "patchcore", 16)
    with pytest.raises(ValueError, match="embedding"):
        CRDHead(matrix, offset, "mean")
    with pytest.raises(ValueError, match="offset"):
        CRDHead(matrix, offset[:5])
    head = CRDHead(*_projection(8, 20, 20), "concat", layer_channels=[8, 12], use_fused=False)
    with pytest.raises(ValueError, match="channels"):
        head(_maps(9, specs=((8, 8, 8), (10, 4, 4))))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_fused_dispatch_eager_only(monkeypatch):
    """use_fused calls crd_fast.ops.crd_head in eager mode, never while tracing; use_fused=False never."""
    calls = []

    def fake(maps, matrix, offset, embedding, target_dim):
        calls.append((embedding, target_dim, matrix.dtype))
        return reference.crd_head(maps, matrix, offset, embedding, target_dim, dtype=torch.float32)

    monkeypatch.setattr(head_mod, "fused_crd_head", fake)
    maps = _maps(10)
    matrix, offset = _projection(11, 20, 20)
    fused = CRDHead(matrix, offset, "concat", layer_channels=[8, 12])
    fused(maps)
    assert calls == [("concat", 1024, torch.float32)]
    torch.jit.trace(fused, (maps,), check_trace=False)
    assert len(calls) == 1
    CRDHead(matrix, offset, "concat", layer_channels=[8, 12], use_fused=False)(maps)
    assert len(calls) == 1


def test_real_fused_op_is_used_and_matches():
    assert head_mod.fused_crd_head is fused_op  # the head calls the op itself, no look-up
    maps = _maps(12)
    matrix, offset = _projection(13, 20, 20)
    got = CRDHead(matrix, offset, "concat", layer_channels=[8, 12])(maps)
    want = reference.crd_head(maps, matrix, offset)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.max()))


# ---- anomaly maps ------------------------------------------------------------------------------------
def test_gaussian_kernel_size_and_mass():
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 2 * int(4 * 4.0 + 0.5) + 1 == 33
    assert abs(float(k.sum()) - 1) < 1e-12 and int(k.argmax()) == 16


def test_mapper_matches_scipy_gaussian_filter():
    g = torch.Generator().manual_seed(0)
    patch = torch.rand(3, 8, 8, generator=g, dtype=torch.float64) * 5
    mapper = AnomalyMapper(64, sigma=4.0).double()
    out = mapper(patch)
    assert out.shape == (3, 64, 64)
    up = torch.nn.functional.interpolate(patch[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    for i in range(3):
        # torch "reflect" padding is scipy's "mirror" mode; truncate=4 gives the same 33-tap kernel.
        want = ndimage.gaussian_filter(up[i].numpy(), sigma=4.0, mode="mirror", truncate=4.0)
        # (the kernel buffer is float32, like every parameter of the exported model)
        np.testing.assert_allclose(out[i].numpy(), want, rtol=1e-6, atol=1e-6)


def test_mapper_properties():
    mapper = AnomalyMapper((48, 40), sigma=4.0)
    const = torch.full((2, 6, 5), 3.5)
    torch.testing.assert_close(mapper(const), torch.full((2, 48, 40), 3.5))
    spike = torch.zeros(1, 6, 5)
    spike[0, 3, 2] = 1.0
    out = mapper(spike)[0]
    assert out.shape == (48, 40)
    assert float(out.max()) < float(AnomalyMapper((48, 40), sigma=0)(spike).max())  # the blur spreads the peak
    y, x = divmod(int(out.argmax()), 40)
    assert abs(y - 28) <= 1 and abs(x - 20) <= 1  # peak stays at the patch centre (3.5 * 8, 2.5 * 8)
    plain = AnomalyMapper(16, sigma=0)(spike)
    up = torch.nn.functional.interpolate(spike[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(plain, up)
    with pytest.raises(ValueError, match="radius"):
        AnomalyMapper(16, sigma=4.0)
    with pytest.raises(ValueError, match="sigma"):
        AnomalyMapper(64, sigma=-1.0)
    with pytest.raises(ValueError, match="patch_map"):
        mapper(torch.zeros(2, 1, 6, 5))


def test_inference_model_outputs():
    ext = FeatureExtractor("resnet18", ("layer2", "layer3"), "random")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        maps = ext(x)
    emb = embed_patches(maps)
    scorer = CRDScorer().fit(patch_matrix(emb))
    model = InferenceModel(
        ext, CRDHead.from_scorer(scorer, layer_channels=[128, 256], use_fused=False), AnomalyMapper(64)
    )
    with torch.inference_mode():
        scores, amaps, pmaps = model(x)
    assert scores.shape == (3,) and amaps.shape == (3, 64, 64) and pmaps.shape == (3, 8, 8)
    assert torch.equal(scores, pmaps.flatten(1).max(dim=1).values)
    want = reference.crd_head(maps, scorer.projection.matrix, scorer.projection.offset)
    torch.testing.assert_close(pmaps.double(), want, rtol=1e-4, atol=1e-4 * float(want.max()))
