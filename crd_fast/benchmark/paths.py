"""The timed paths, built on one shared case so every path sees the same inputs and the same fitted head.

* head: the fused op (``crd_fast.ops.crd_head``) vs the unfused float32 reference path vs exact
  nearest-neighbour search (``NNScorer``, faiss IndexFlatL2 and chunked torch matmul) over memory
  banks of a fraction of the training patches, all on the SAME random feature maps;
* end to end: the detector's ``InferenceModel`` (backbone + head + map) vs its backbone alone and its head alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..core.embedding import check_embedding, embedding_dim
from ..detector.detector import CRDDetector
from ..ops import crd_head, reference
from ..scorers.crd import CRDScorer
from ..scorers.nn import NNScorer
from .inputs import FeatureGenerator, patch_rows


@dataclass
class HeadCase:
    """Everything the head paths share: query maps, their patches, the training bank and the fitted scorer.

    ``matrix`` / ``offset`` are the scorer's full-rank M_pre and mu in float32, as the deployed head
    (``CRDHead``) holds them; every CRD path gets these same tensors.
    """

    embedding: str
    n_train_images: int
    maps: list[Tensor]
    patches: Tensor
    bank: Tensor
    scorer: CRDScorer
    matrix: Tensor
    offset: Tensor
    target_dim: int = 1024

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    @property
    def n_query_images(self) -> int:
        return int(self.maps[0].shape[0])


def make_head_case(
    embedding: str = "concat",
    n_train: int = 200,
    n_query: int = 8,
    seed: int = 0,
    batch: int = 20,
    generator: Optional[FeatureGenerator] = None,
    target_dim: int = 1024,
) -> HeadCase:
    """Training bank + fitted CRD scorer from ``n_train`` random images, and ``n_query`` query images.

    The training maps are embedded batch by batch into one float32 bank (what an NN detector stores)
    and streamed into ``CRDScorer.partial_fit`` (what CRD keeps: the d x d statistics).
    """
    check_embedding(embedding)
    if n_train < 1 or n_query < 1 or batch < 1:
        raise ValueError(f"n_train, n_query and batch must be positive, got {n_train}, {n_query}, {batch}")
    gen = generator or FeatureGenerator(seed=seed)
    d = embedding_dim(gen.channels, embedding, target_dim)
    bank = torch.empty(n_train * gen.patches_per_image, d, dtype=torch.float32)
    scorer = CRDScorer()
    row = 0
    for maps in gen.batches(n_train, batch):
        rows = patch_rows(maps, embedding, target_dim)
        bank[row : row + rows.shape[0]] = rows
        row += rows.shape[0]
        scorer.partial_fit(rows)
    query = gen.maps(n_query, index=10_000_000)  # far from every training batch's seed
    proj = scorer.projection
    return HeadCase(
        embedding,
        n_train,
        query,
        patch_rows(query, embedding, target_dim),
        bank,
        scorer,
        proj.matrix.float().contiguous(),
        proj.offset.float().contiguous(),
        target_dim,
    )


def fused_path(case: HeadCase) -> Callable[[], Tensor]:
    """The fused op: feature maps -> (B, 28, 28) float32 scores, never building the embedding."""
    maps, matrix, offset = case.maps, case.matrix, case.offset
    return lambda: crd_head(maps, matrix, offset, case.embedding, case.target_dim)


def reference_path(case: HeadCase) -> Callable[[], Tensor]:
    """The unfused reference in float32: pool, resize, concat (reduce), project every patch, norm."""
    maps, matrix, offset = case.maps, case.matrix, case.offset
    return lambda: reference.crd_head(maps, matrix, offset, case.embedding, case.target_dim, dtype=torch.float32)


def nn_scorer(case: HeadCase, fraction: float, backend: str) -> NNScorer:
    """An exact 1-NN scorer over a seeded random ``fraction`` of the training bank, index built."""
    scorer = NNScorer(subsample=None if fraction >= 1.0 else fraction, backend=backend, seed=0).fit(case.bank)
    scorer.score(case.patches[:1])  # builds the faiss index / caches the torch bank norms outside any timing
    return scorer


def nn_path(case: HeadCase, scorer: NNScorer) -> Callable[[], Tensor]:
    """The NN head: the same maps embedded (as the reference does) then searched; scores as (B, H, W)."""
    maps, b, (h, w) = case.maps, case.n_query_images, tuple(case.maps[0].shape[-2:])
    return lambda: scorer.score(patch_rows(maps, case.embedding, case.target_dim)).reshape(b, h, w)


def max_relative_error(scores: Tensor, ref: Tensor) -> float:
    """max |scores - ref| / |ref| over all entries (ref entries of 0 compare by absolute error)."""
    a, b = scores.double(), ref.double()
    return float(((a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float64).tiny)).max())


# ---- the end-to-end case --------------------------------------------------------------------------
@dataclass
class EndToEndCase:
    """A fitted detector's ``InferenceModel``, a normalised image batch and its feature maps."""

    backbone: str
    crop: int
    model: torch.nn.Module
    x: Tensor
    features: list[Tensor]

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


def make_e2e_case(
    backbone: str = "wide_resnet50_2", crop: int = 224, batch: int = 8, n_fit: int = 8, seed: int = 0
) -> EndToEndCase:
    """A CRDDetector with seeded random weights fitted on ``n_fit`` random images; its inference model.

    Throughput does not depend on the weights' values, so random weights time the real network.
    """
    gen = torch.Generator().manual_seed(seed)
    det = CRDDetector(backbone=backbone, weights="random", resize=crop, crop=crop, batch_size=batch, seed=seed)
    det.fit(torch.rand(max(n_fit, 2), 3, crop, crop, generator=gen), progress=False)
    model = det.inference_model()
    x = det.preprocess.batch(torch.rand(batch, 3, crop, crop, generator=gen)).contiguous()
    with torch.inference_mode():
        features = [f.clone() for f in model.extractor(x)]
    return EndToEndCase(backbone, crop, model, x, features)


def e2e_paths(case: EndToEndCase) -> dict[str, Callable[[], Any]]:
    """ "backbone" (feature maps only), "head" (the model's CRD head on those maps), "full" (the whole model)."""
    model, x, features = case.model, case.x, case.features

    def inference(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return fn()

        return run

    return {
        "backbone": inference(lambda: model.extractor(x)),
        "head": inference(lambda: model.head(features)),
        "full": inference(lambda: model(x)),
    }
