"""The sizes of one benchmark run (``crd-fast bench`` and the suites in bench/suites/). Torch-free: the CLI reads
``PARTS`` for ``--help``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..choices import EMBEDDINGS

#: The parts of a run, in the order they run.
PARTS: tuple[str, ...] = ("head", "e2e", "fit")
#: wide_resnet50_2 layer2 and layer3 maps at 224 px: (channels, height, width).
WRN50_LAYERS: tuple[tuple[int, int, int], ...] = ((512, 28, 28), (1024, 14, 14))
#: Memory banks as fractions of all training patches.
BANK_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 1.0)
#: Relative tolerance of "the same scores" for the fused head vs the float32 reference.
SCORE_RTOL = 1e-4


def _all_embeddings() -> tuple[str, ...]:
    return tuple(EMBEDDINGS)


@dataclass
class BenchConfig:
    """Sizes of one run (the CLI's and bench/suites/'); ``quick()`` gives a run of two minutes or so on 2 cores.

    ``nn_rounds`` holds the rounds per bank fraction: exact NN over the 100% bank takes about a minute
    per call on 2 cores, so it gets fewer.
    """

    n_train: int = 200
    n_query: int = 8
    embeddings: tuple[str, ...] = field(default_factory=_all_embeddings)
    fractions: tuple[float, ...] = BANK_FRACTIONS
    backends: tuple[str, ...] = ("faiss", "torch")
    rounds: int = 10
    nn_rounds: tuple[int, ...] = (5, 3, 2)
    e2e_backbone: str = "wide_resnet50_2"
    e2e_crop: int = 224
    e2e_batch: int = 8
    e2e_rounds: int = 5
    fit_sizes: tuple[int, ...] = (50, 200, 1000)
    fit_dim: int = 1536
    parts: tuple[str, ...] = PARTS
    quick_run: bool = False
    layers: tuple[tuple[int, int, int], ...] = WRN50_LAYERS
    target_dim: int = 1024

    @classmethod
    def quick(cls, **changes: Any) -> "BenchConfig":
        base = dict(
            n_train=20,
            embeddings=("concat",),
            rounds=3,
            nn_rounds=(3, 2, 1),
            e2e_batch=2,
            e2e_rounds=2,
            fit_sizes=(4, 16),
            quick_run=True,
        )
        base.update(changes)
        return cls(**base)

    @classmethod
    def from_env(cls) -> "BenchConfig":
        """``quick()`` when CRD_BENCH_QUICK is set (not "" or "0"), else the full sizes."""
        quick = os.environ.get("CRD_BENCH_QUICK", "") not in ("", "0")
        return cls.quick() if quick else cls()

    def rounds_for(self, fraction: float) -> int:
        """Timed rounds of the NN search over the ``fraction`` bank."""
        return self.nn_rounds[self.fractions.index(fraction)] if fraction in self.fractions else 1

    def describe(self) -> str:
        """One line with the sizes of this run (the table's "sizes:" line)."""
        maps = " + ".join("x".join(str(v) for v in layer) for layer in self.layers)
        banks = ", ".join(f"{f * 100:g}%" for f in self.fractions)
        return (
            f"{'QUICK run (smaller than the full sizes), ' if self.quick_run else ''}"
            f"head: {self.n_train} training images x {self.layers[0][1] * self.layers[0][2]} patches "
            f"(maps {maps}), {self.n_query} query images, "
            f"embeddings {', '.join(self.embeddings)}, banks {banks}; "
            f"e2e: {self.e2e_backbone} {self.e2e_crop} px batch {self.e2e_batch}; "
            f"fit: {', '.join(str(n) for n in self.fit_sizes)} images at d={self.fit_dim}"
        )
