"""The reference head: pooling, resizing, embeddings and scoring, checked against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crd_fast import CRDScorer
from crd_fast.core import embedding
from crd_fast.ops import reference as ref


def test_pooling_counts_zero_padding():
    out = embedding.pool_feature_map(torch.ones(1, 1, 4, 4))
    assert out[0, 0, 0, 0] == pytest.approx(4 / 9)
    assert out[0, 0, 0, 1] == pytest.approx(6 / 9)
    assert out[0, 0, 1, 1] == pytest.approx(1.0)


def test_concat_embedding_layout():
    torch.manual_seed(0)
    l2, l3 = torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)
    emb = embedding.embed_patches([l2, l3], "concat")
    assert emb.shape == (2, 12, 8, 8)
    torch.testing.assert_close(emb[:, :5], embedding.pool_feature_map(l2))
    up = F.interpolate(embedding.pool_feature_map(l3), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(emb[:, 5:], up)
    assert embedding.embedding_dim([5, 7], "concat") == 12


def test_patchcore_reduction_is_two_adaptive_poolings():
    torch.manual_seed(1)
    feats = torch.randn(10, 512 + 1024)
    out = embedding.patchcore_reduce(feats, [512, 1024], 1024)
    assert out.shape == (10, 1024)
    # layer2 channels are repeated to 1024 then pairs averaged back: the first half equals layer2 itself;
    # layer3 (already 1024) passes, then adjacent pairs are averaged.
    torch.testing.assert_close(out[:, :512], feats[:, :512])
    torch.testing.assert_close(out[:, 512:], feats[:, 512:].reshape(10, 512, 2).mean(-1))
    emb = embedding.embed_patches([torch.randn(1, 512, 6, 6), torch.randn(1, 1024, 3, 3)], "patchcore")
    assert emb.shape == (1, 1024, 6, 6)


def test_head_equals_scorer_on_embedded_patches():
    torch.manual_seed(2)
    maps = [torch.randn(3, 6, 8, 8, dtype=torch.float64), torch.randn(3, 10, 4, 4, dtype=torch.float64)]
    patches = embedding.patch_matrix(embedding.embed_patches(maps))
    scorer = CRDScorer().fit(patches)
    proj = scorer.projection
    head = ref.crd_head(maps, proj.matrix, proj.offset)
    assert head.shape == (3, 8, 8) and head.dtype == torch.float64
    torch.testing.assert_close(head.reshape(-1), scorer.score(patches), rtol=1e-12, atol=1e-12)
    head32 = ref.crd_head(maps, proj.matrix, proj.offset, dtype=torch.float32)
    assert head32.dtype == torch.float32
    torch.testing.assert_close(head32.double(), head, rtol=1e-4, atol=1e-5)


def test_bad_embedding_and_maps():
    with pytest.raises(ValueError, match="embedding"):
        embedding.embed_patches([torch.zeros(1, 2, 3, 3)], "mean")
    with pytest.raises(ValueError, match="feature map 1"):
        embedding.embed_patches([torch.zeros(2, 2, 3, 3), torch.zeros(1, 2, 3, 3)])
    with pytest.raises(ValueError, match="at least one"):
        embedding.embed_patches([])
