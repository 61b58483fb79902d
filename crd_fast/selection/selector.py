"""LabelFreeSelector: the label-free choice of scoring model and lam_rel, fed batch by batch during a fit.

    selector = LabelFreeSelector(templates, lam_grid, count, asked, seed)   # templates: unfitted models, simplest first
    for x, grids in batches:                # normalised inputs (B, 3, S, S) and their patch grids (B, P, d)
        selector.add(x, grids)
    model, record = selector.finish(embed, mean, std, patch_grid)

It holds out a few images (:class:`~crd_fast.selection.plan.HeldOutPlan`), fits every open model on the rest (a
model that ``derives`` another, e.g. the local CRD's pooled statistics give the global CRD, is fitted once for both)
and keeps the held-out images' grids, paints the pseudo-defects of each design on the held-out images, lets
:func:`~crd_fast.selection.choice.choose_family` choose the model on the clean held-out grids, adds those grids to
the chosen model's fit on the rest (in the order they came: exact for the global statistics, the Frequent
Directions update for the local model) and drops them, then lets :func:`~crd_fast.selection.choice.choose_lam`
choose lam_rel on the pseudo-defects; it returns the chosen model fitted on all images with its
:class:`SelectionRecord`. docs/DESIGN.md "The detector's choice of spatial model and lam_rel".
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..choices import DEFAULT_LAM_REL
from ..core.memory import release_free_memory
from ..scoring.base import ScoringModel
from .choice import CRITERION, choose_family, choose_lam
from .held_out import PSEUDO_DESIGNS, PSEUDO_STRENGTH, EmbeddedInBatches, HeldOutSet, pseudo_defect_batch
from .plan import HeldOutPlan, fallback_reason
from .record import SelectionRecord

#: Held-out images added to the chosen model's fit at a time.
HELD_BATCH = 8
#: Pseudo-defect images embedded at a time, at most (they are still scored a whole batch at a time: the local
#: candidate's cost per call hardly depends on the images): with the chosen candidate, the sketches and the fit's
#: statistics alive, the forward pass's temporaries are the choice's peak (at 224 px with wide_resnet50_2 about
#: 350 MB for 8 images, 160 MB for 4: bench/RESULTS.md "The label-free choice's cost against a plain fit"). A
#: backbone embeds each image alike in a batch of 4 or 8 (bitwise on the CPU there; to rounding elsewhere).
PSEUDO_BATCH = 4


def embedded_in_pieces(
    embed: Callable[[torch.Tensor], torch.Tensor], piece: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``embed`` applied ``piece`` images at a time, the grids written into one (n, P, d) tensor as they come."""

    def pieces(x: torch.Tensor) -> torch.Tensor:
        first = embed(x[:piece])
        if x.shape[0] <= piece:
            return first
        out = torch.empty((x.shape[0],) + tuple(first.shape[1:]), dtype=first.dtype, device=first.device)
        out[:piece] = first
        del first
        for start in range(piece, x.shape[0], piece):
            out[start : start + piece] = embed(x[start : start + piece])
        return out

    return pieces


def default_choice(families: Sequence[str], lam_grid: Sequence[float]) -> tuple[str, float]:
    """(model, lam_rel) without a selection: "global" when open (else the simplest open model), DEFAULT_LAM_REL
    when lam_rel is open (else the one fixed value)."""
    spatial = "global" if "global" in families else families[0]
    lam = float(lam_grid[0]) if len(lam_grid) == 1 else DEFAULT_LAM_REL
    return spatial, lam


class LabelFreeSelector:
    """Chooses among ``templates`` (name -> unfitted model with the detector's options, simplest first) and the
    lam_rel values of ``lam_grid`` (one value: lam_rel is fixed) while a fit from empty streams its images.

    ``count``: the number of training images when known (it spaces the held-out images evenly); ``asked``: the
    options as given, for the record; ``seed``: the pseudo-defects' seed.
    """

    def __init__(
        self,
        templates: Mapping[str, ScoringModel],
        lam_grid: Sequence[float],
        count: Optional[int],
        asked: Mapping[str, Any],
        seed: int,
    ) -> None:
        if not templates:
            raise ValueError("no scoring model to choose from")
        self.families = list(templates)
        self.lam_grid = tuple(float(g) for g in lam_grid)
        self.asked = dict(asked)
        self.seed = seed
        # each open model is fitted directly unless another open model's fit gives it (``derives``)
        self.source = {
            f: next((g for g in self.families if g != f and f in templates[g].derives), f) for f in self.families
        }
        sources = [f for f in self.families if self.source[f] == f]
        self.rest = {f: templates[f].fresh() for f in sources}
        self.plan = HeldOutPlan(count)
        self.seen = 0
        self._held_inputs: list[torch.Tensor] = []
        # the held-out images' grids as they came (one entry per batch): the choice's clean images, then the
        # chosen model's last update; no model is fitted on them apart (it would only be merged at the end)
        self._held_grids: list[torch.Tensor] = []
        self._grid_device: Optional[torch.device] = None

    def add(self, x: torch.Tensor, grids: torch.Tensor) -> None:
        """One batch of the training stream: normalised inputs (B, 3, S, S) and their patch grids (B, P, d)."""
        self._grid_device = grids.device
        hold = torch.tensor([self.plan.take(self.seen + i) for i in range(x.shape[0])], dtype=torch.bool)
        if bool(hold.any()):
            idx = hold.nonzero()[:, 0].to(grids.device)
            self._held_grids.append(grids[idx].float().cpu())
            self._held_inputs.append(x[idx.to(x.device)].detach().cpu())
        if not bool(hold.all()):
            rest = grids[(~hold).nonzero()[:, 0].to(grids.device)]
            # the batch's forward pass left freed heap resident (crd_fast/core/memory.py); the statistics' float64
            # copy is mmap'd and would come on top of it, beside the sketches and held-out grids plain fits lack
            release_free_memory()
            for model in self.rest.values():
                model.partial_fit(rest)
        self.seen += int(x.shape[0])

    def finish(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        patch_grid: tuple[int, int],
        batch: int = HELD_BATCH,
    ) -> tuple[ScoringModel, SelectionRecord]:
        """Choose, and return the chosen model fitted on every image (lam_rel set) with the record.

        ``embed``: normalised inputs (n, 3, S, S) on the CPU -> their patch grids (n, P, d), float32 on the CPU (the
        pseudo-defects' forward passes, scored ``batch`` images at a time and embedded at most PSEUDO_BATCH at a
        time); ``mean``/``std``: the preprocessing's normalisation (to paint on the picture); ``patch_grid``: (h, w).
        """
        if self.seen == 0:
            raise ValueError("no images to fit on")
        started = time.perf_counter()
        why_not = fallback_reason(self.seen, self.plan.held)
        if why_not is not None:
            spatial, lam = default_choice(self.families, self.lam_grid)
            record = SelectionRecord.without_selection(self.asked, spatial, lam, self.seen, self.plan.held)
            model = self._fitted_on_all(spatial)
        else:
            painting_started = time.perf_counter()
            held_set = self._held_out_set(embedded_in_pieces(embed, PSEUDO_BATCH), mean, std, patch_grid, batch)
            painting_seconds = time.perf_counter() - painting_started
            release_free_memory()  # the stream's freed heap, before the candidates' memory comes on top
            models_started = time.perf_counter()
            candidates = {f: self._rest_model(f).candidate() for f in self.families}
            model_seconds = time.perf_counter() - models_started
            family = choose_family(held_set, self.lam_grid, candidates)  # with the clean maps choose_lam reads
            chosen = candidates[family.spatial]
            del candidates  # the other candidates' models go before the pseudo-defects are embedded beside the chosen
            # the clean grids are scored: add them to the chosen model's fit now and drop them, so they are not
            # alive beside the pseudo-defects' forward passes (the candidate holds arrays of its own: the update
            # rebinds the statistics' tensors, never writes into them)
            held_set.release_clean()
            release_free_memory()
            model = self._fitted_on_all(family.spatial)
            release_free_memory()
            decision = choose_lam(held_set, self.lam_grid, chosen, family)
            pseudo_seconds = painting_seconds + held_set.pseudo.seconds
            kinds = sorted(set(held_set.kinds))
            designs = [d.to_dict(held_set.designs[d.name]) for d in PSEUDO_DESIGNS]
            del chosen, family, held_set
            spatial, lam = decision.spatial, decision.lam_rel
            record = SelectionRecord(
                asked=self.asked,
                spatial=spatial,
                lam_rel=lam,
                n_images=self.seen,
                held_out=self.plan.held,
                grid=list(self.lam_grid),
                families=decision.families,
                paired_likelihood=decision.paired_likelihood,
                evidence=decision.evidence,
                criterion=CRITERION,
                pseudo_strength=PSEUDO_STRENGTH,
                pseudo_defects=kinds,
                pseudo_designs=designs,
                pseudo_defect_seconds=round(pseudo_seconds, 4),
                model_seconds=round(model_seconds, 4),
            )
        if model.has_lam_rel:
            model.set_lam_rel(lam)
        record.seconds = round(time.perf_counter() - started, 4)
        return model, record

    def _rest_model(self, family: str) -> ScoringModel:
        source = self.rest[self.source[family]]
        return source if self.source[family] == family else source.derive(family)

    def _fitted_on_all(self, family: str) -> ScoringModel:
        """The fit on the rest, updated with the held-out grids (in the order they came, up to HELD_BATCH images
        at a time) and those dropped; the other models fitted on the rest go."""
        name = self.source[family]
        model = self.rest[name]
        self.rest = {}
        device = self._grid_device if self._grid_device is not None else torch.device("cpu")
        batches = []
        while self._held_grids:  # in batches of up to HELD_BATCH images, in the order they came
            batch = [self._held_grids.pop(0)]
            while self._held_grids and sum(g.shape[0] for g in batch) + self._held_grids[0].shape[0] <= HELD_BATCH:
                batch.append(self._held_grids.pop(0))
            batches.append(torch.cat(batch))  # a copy of its own: the held-out grids (views of one) go now
        while batches:  # each batch freed once added, and the update's freed heap handed back before the next
            grids = batches.pop(0)
            release_free_memory()
            model.partial_fit(grids.to(device))
            del grids
        return model if name == family else model.derive(family)

    def _held_out_set(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        patch_grid: tuple[int, int],
        batch: int,
    ) -> HeldOutSet:
        """The held-out images' clean grids and pseudo-defects (one per image and design of ``PSEUDO_DESIGNS``, in
        that order): each design painted now (its inputs are small, (H, 3, S, S)), embedded ``batch`` images at a
        time only when the chosen candidate scores them (``EmbeddedInBatches``)."""
        clean_inputs = torch.cat(self._held_inputs)
        self._held_inputs = []
        clean = torch.cat(self._held_grids)
        self._held_grids = list(torch.split(clean, [g.shape[0] for g in self._held_grids]))  # views: one copy
        painted, masks, kinds = [], [], []
        for design in PSEUDO_DESIGNS:
            pseudo_x, design_masks, design_kinds = pseudo_defect_batch(
                clean_inputs, mean, std, self.seed, design=design
            )
            painted.append(pseudo_x)
            masks.append(design_masks)
            kinds += design_kinds
        del clean_inputs
        pseudo = EmbeddedInBatches(painted, embed, tuple(clean.shape[1:]), batch)
        designs = {design.name: int(x.shape[0]) for design, x in zip(PSEUDO_DESIGNS, painted)}
        return HeldOutSet.build(clean, pseudo, np.concatenate(masks), kinds, patch_grid, designs)


__all__ = ["LabelFreeSelector", "default_choice"]
