"""The held-out images of the label-free choice: their clean patch grids and the pseudo-defects painted on them.

Each design of ``PSEUDO_DESIGNS`` paints one pseudo-defect on every held-out image (crd_fast/synthetic/pseudo.py),
on the de-normalised picture (the backbone's own mean and std, so HED's BGR 0-255 convention as well), the other
held-out pictures as cut-and-paste donors; they are normalised again and embedded by the detector. Two designs,
pooled: the faint kinds at ``PSEUDO_STRENGTH`` ("x4") and the defect-like kinds at strength 2 ("like2"), as
bench/RESULTS.md "Choosing lam_rel without labels" recommends (docs/DESIGN.md "Label-free lam").
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from ..core.lam_selection import grid_masks
from ..core.memory import release_free_memory
from ..scoring.candidates import Candidate
from ..synthetic.pseudo import DEFECT_LIKE, PSEUDO_DEFECTS, make_pseudo_defects

#: The faint pseudo-defects' painted change is multiplied by this (``make_pseudo_defects``'s strength): at 1 a
#: random backbone on the development set told none of them from clean images at any lam (docs/DESIGN.md
#: "Label-free lam").
PSEUDO_STRENGTH = 4.0
#: The defect-like pseudo-defects' strength (bench/RESULTS.md "Choosing lam_rel without labels": "like x2").
DEFECT_LIKE_STRENGTH = 2.0


@dataclass(frozen=True)
class PseudoDesign:
    """One pseudo-defect per held-out image: ``kinds`` (names of crd_fast/synthetic/pseudo.py, in turn) at
    ``strength``. ``stream``: None draws from ``default_rng(seed)`` (the detector's first design, as earlier
    versions painted it); a number from an independent stream ``default_rng([seed, stream])``, as the study
    seeded each design apart (bench/experiments/lam_criteria_sets.py ``pseudo_fold``)."""

    name: str
    kinds: tuple[str, ...]
    strength: float
    stream: Optional[int] = None

    def rng(self, seed: int) -> np.random.Generator:
        return np.random.default_rng(seed if self.stream is None else [seed, self.stream])

    def to_dict(self, images: int) -> dict[str, Any]:
        """The record's form: name, kinds, strength and the number of images painted."""
        return {"name": self.name, "kinds": list(self.kinds), "strength": self.strength, "images": images}


#: The designs painted on the held-out images and pooled by the choice of lam_rel (the study's "x4 + like x2").
PSEUDO_DESIGNS: tuple[PseudoDesign, ...] = (
    PseudoDesign("x4", tuple(PSEUDO_DEFECTS), PSEUDO_STRENGTH),
    PseudoDesign("like2", tuple(DEFECT_LIKE), DEFECT_LIKE_STRENGTH, zlib.crc32(b"like2")),
)


def pseudo_defect_batch(
    clean: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    strength: float = PSEUDO_STRENGTH,
    design: Optional[PseudoDesign] = None,
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """One pseudo-defect per normalised input of ``clean`` (H, 3, S, S), made on the de-normalised picture: of
    ``design``, or (None) of the faint kinds at ``strength`` drawn from ``default_rng(seed)``.

    Returns the pseudo-defect inputs normalised again with ``mean``/``std`` (H, 3, S, S) float32, their pixel
    masks (H, S, S) bool and the kinds painted. The other held-out pictures are the cut-and-paste donors.
    """
    design = design or PseudoDesign("x", tuple(PSEUDO_DEFECTS), strength)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    pictures = (clean.float().cpu() * s + m).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().numpy()
    images, masks, kinds = make_pseudo_defects(
        design.rng(seed), list(pictures), list(pictures), kinds=design.kinds, strength=design.strength
    )
    painted = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return ((painted - m) / s).contiguous(), np.stack(masks), kinds


class PseudoGrids(Protocol):
    """The pseudo-defect grids as the choice reads them: how many (``len``), their (P, d) (``grid_shape``), their
    patch scores (L, n, P) under a candidate at some lams (``maps``), and the seconds spent making the grids."""

    seconds: float

    def __len__(self) -> int: ...

    @property
    def grid_shape(self) -> tuple[int, ...]: ...

    def maps(self, candidate: Candidate, lams: Sequence[float]) -> np.ndarray: ...


class GridsInMemory:
    """Pseudo-defect grids (n, P, d) held whole (small sets: tests, studies)."""

    def __init__(self, grids: torch.Tensor) -> None:
        self.grids = grids
        self.seconds = 0.0

    def __len__(self) -> int:
        return int(self.grids.shape[0])

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(self.grids.shape[1:])

    def maps(self, candidate: Candidate, lams: Sequence[float]) -> np.ndarray:
        return candidate.maps(self.grids, lams)


class EmbeddedInBatches:
    """Pseudo-defect inputs (each design's (H, 3, S, S), normalised) embedded ``batch`` images at a time when they
    are scored, each batch's grids dropped once scored: the (D H, P, d) float32 grid (231 MB for 48 images of
    784 x 1536) is never held, nor is it beside the candidate models. ``embed``: inputs -> (n, P, d) grids; with
    ``batch`` the detector's batch size the grids are those of embedding each design's inputs whole."""

    def __init__(
        self,
        inputs: Sequence[torch.Tensor],
        embed: Callable[[torch.Tensor], torch.Tensor],
        grid_shape: tuple[int, ...],
        batch: int,
    ) -> None:
        if batch < 1:
            raise ValueError(f"the pseudo-defects' batch must be a positive number of images, got {batch}")
        self.inputs = list(inputs)
        self.embed = embed
        self._grid_shape = tuple(grid_shape)
        self.batch = int(batch)
        self.seconds = 0.0  # forward passes, over every call of maps()

    def __len__(self) -> int:
        return sum(int(x.shape[0]) for x in self.inputs)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return self._grid_shape

    def _batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first image, grids) of each batch, design by design (a batch never spans two designs)."""
        first = 0
        for design_inputs in self.inputs:
            for start in range(0, design_inputs.shape[0], self.batch):
                started = time.perf_counter()
                grids = self.embed(design_inputs[start : start + self.batch])
                release_free_memory()  # the forward pass's freed heap, before the scoring threads' memory
                self.seconds += time.perf_counter() - started
                if tuple(grids.shape[1:]) != self._grid_shape:
                    raise ValueError(
                        f"the pseudo-defects embed to {tuple(grids.shape[1:])} grids, the clean ones are "
                        f"{self._grid_shape}"
                    )
                yield first + start, grids
            first += design_inputs.shape[0]

    def maps(self, candidate: Candidate, lams: Sequence[float]) -> np.ndarray:
        out = np.empty((len(lams), len(self), self._grid_shape[0]), dtype=np.float32)
        for first, grids in self._batches():
            out[:, first : first + grids.shape[0]] = candidate.maps(grids, lams)
            del grids
        return out


@dataclass
class HeldOutSet:
    """The held-out images' patch grids, clean and with pseudo-defects (every design's in turn, ``designs``: name
    -> images), and the pseudo-defect grid masks. ``pseudo``: (D H, P, d) grids (held as ``GridsInMemory``) or
    any ``PseudoGrids``."""

    clean: Optional[torch.Tensor]  # (H, P, d) float32; None once released (``release_clean``)
    pseudo: Union[torch.Tensor, PseudoGrids]  # D designs' H images each
    masks: np.ndarray  # (D H, h, w) bool, on the patch grid
    kinds: list[str]
    designs: dict[str, int] = field(default_factory=dict)
    clean_shape: tuple[int, ...] = field(init=False)  # (H, P, d), kept when the grids are released

    def __post_init__(self) -> None:
        if self.clean is None:
            raise ValueError("a held-out set needs its clean grids")
        self.clean_shape = tuple(self.clean.shape)
        if isinstance(self.pseudo, torch.Tensor):
            self.pseudo = GridsInMemory(self.pseudo)
        n = len(self.pseudo)
        if self.masks.shape[0] != n or (self.kinds and len(self.kinds) != n):
            raise ValueError(f"{n} pseudo-defect grids but {self.masks.shape[0]} masks and {len(self.kinds)} kinds")
        if self.designs and sum(self.designs.values()) != n:
            raise ValueError(f"the designs {self.designs} do not add up to the {n} pseudo-defect grids")
        if self.clean_shape[1:] != self.pseudo.grid_shape:
            raise ValueError(
                f"clean grids {self.clean_shape} and pseudo-defect grids "
                f"{(n,) + self.pseudo.grid_shape} differ in positions or dimension"
            )

    @property
    def n_clean(self) -> int:
        """The number of clean held-out images (also once their grids are released)."""
        return int(self.clean_shape[0])

    @property
    def clean_grids(self) -> torch.Tensor:
        """The clean grids (H, P, d); a clear error once they were released."""
        if self.clean is None:
            raise ValueError("the clean held-out grids were released (release_clean): score them before that")
        return self.clean

    def release_clean(self) -> None:
        """Drop this set's reference to the clean grids, once every score of them the choice needs was taken
        (the selector adds them to the chosen model's fit before the pseudo-defects' forward passes)."""
        self.clean = None

    @property
    def labels(self) -> np.ndarray:
        """0 for each clean image, then 1 for each pseudo-defect image."""
        return np.concatenate([np.zeros(self.n_clean, dtype=int), np.ones(len(self.pseudo), dtype=int)])

    @property
    def all_masks(self) -> np.ndarray:
        """The grid masks of the clean images (all False), then the pseudo-defects'."""
        clean = np.zeros((self.n_clean,) + self.masks.shape[1:], dtype=bool)
        return np.concatenate([clean, self.masks])

    @classmethod
    def build(
        cls,
        clean: torch.Tensor,
        pseudo: Union[torch.Tensor, PseudoGrids],
        pixel_masks: np.ndarray,
        kinds: list[str],
        grid_shape: tuple[int, int],
        designs: Optional[dict[str, int]] = None,
    ) -> "HeldOutSet":
        """From the grids and the pseudo-defects' pixel masks (reduced to the (h, w) patch grid)."""
        return cls(clean, pseudo, grid_masks(pixel_masks, grid_shape), kinds, dict(designs or {}))


__all__ = [
    "DEFECT_LIKE_STRENGTH",
    "PSEUDO_DESIGNS",
    "PSEUDO_STRENGTH",
    "EmbeddedInBatches",
    "GridsInMemory",
    "HeldOutSet",
    "PseudoGrids",
    "PseudoDesign",
    "pseudo_defect_batch",
]
