"""Real inspection images from a registry package: the polycrystalline solar cells of ``elpv-dataset``.

``elpv-dataset`` (pip install elpv-dataset; images CC BY-NC-SA 4.0) holds 2,624 electroluminescence images of
solar cells, 300 x 300 grayscale, each with the probability that an expert judged it defective. Its 1,550
polycrystalline ("poly") cells are the aligned parts crd-fast is developed and tuned on: good = probability 0 (920
cells), defective = probability 1 (402 cells). :func:`write_elpv_poly` writes a seeded split of them in the MVTec AD
folder layout (train/good, test/good, test/defect; no pixel masks exist), so the detector, ``crd-fast eval`` and the
report read them like any other data set. The monocrystalline cells are never used here.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image

from ..io.atomic import atomic_write
from ..io.safety import check_outputs

PACKAGE = "elpv-dataset"
INSTALL_HINT = "pip install elpv-dataset   (or: pip install 'crd-fast[demo]')"
#: Written into a split's folder, so that a later run may replace it and never anything else.
MARKER = "crd_fast_elpv.json"
CATEGORY = "elpv_poly"
#: Cells of the poly set: good (probability 0) and defective (probability 1).
POLY_GOOD, POLY_DEFECTIVE = 920, 402


class MissingDataPackage(ImportError):
    """The registry package holding the data is not installed (the message says how to install it)."""


def available() -> bool:
    """Whether ``elpv-dataset`` is installed."""
    return importlib.util.find_spec("elpv_dataset") is not None


@dataclass(frozen=True)
class ElpvSplit:
    """Where :func:`write_elpv_poly` wrote the cells, and how many of each."""

    root: Path  # the category folder (MVTec AD layout)
    n_train: int
    n_test_good: int
    n_test_defect: int
    seed: int


@functools.lru_cache(maxsize=1)
def poly_cells() -> tuple[np.ndarray, np.ndarray]:
    """(good, defective) poly cells as (N, 300, 300) uint8 arrays (read-only), in the package's order; read once."""
    if not available():
        raise MissingDataPackage(f"the real solar-cell images come from the package {PACKAGE}: {INSTALL_HINT}")
    from elpv_dataset.utils import load_dataset

    images, probs, types = load_dataset()
    poly = np.asarray(types) == "poly"
    good, bad = images[poly & (probs == 0.0)], images[poly & (probs == 1.0)]
    good.flags.writeable = bad.flags.writeable = False  # shared by every caller
    return good, bad


def write_elpv_poly(
    root: Union[str, Path],
    n_train: int = 200,
    n_test_good: int = 100,
    n_test_defect: int = 100,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ElpvSplit:
    """Write a seeded split of the poly cells under ``root``/elpv_poly: ``n_train`` good training cells and
    ``n_test_good`` good + ``n_test_defect`` defective test cells, none shared (PNG, 300 x 300 grayscale).

    A folder this function wrote before (it holds the marker file) is replaced; any other is refused, so user
    data is never deleted. ``progress(done, total)`` is called after every image.
    """
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    good, bad = poly_cells()
    if n_train + n_test_good > len(good) or n_test_defect > len(bad):
        raise ValueError(
            f"asked for {n_train} + {n_test_good} good and {n_test_defect} defective poly cells; "
            f"the package holds {len(good)} and {len(bad)}"
        )
    rng = np.random.default_rng(seed)
    good_order, bad_order = rng.permutation(len(good)), rng.permutation(len(bad))
    folders = {
        "train/good": good[good_order[:n_train]],
        "test/good": good[good_order[n_train : n_train + n_test_good]],
        "test/defect": bad[bad_order[:n_test_defect]],
    }
    out = Path(root) / CATEGORY
    check_outputs(folders=[out])  # a folder to be replaced: not a device, link loop or unwritable place
    if out.exists():
        if not (out / MARKER).is_file():
            raise FileExistsError(
                f"{out} exists and was not written by crd_fast's elpv split; refusing to overwrite it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    info = {"source": PACKAGE, "cells": "poly", "n_train": n_train, "n_test_good": n_test_good,
            "n_test_defect": n_test_defect, "seed": seed}  # fmt: skip
    with atomic_write(out / MARKER) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    total, done = sum(len(v) for v in folders.values()), 0
    for folder, cells in folders.items():
        for i, cell in enumerate(cells):
            with atomic_write(out / folder / f"{i:03d}.png") as tmp:
                Image.fromarray(cell).save(tmp, format="PNG", compress_level=1)
            done += 1
            if progress is not None:
                progress(done, total)
    return ElpvSplit(out, n_train, n_test_good, n_test_defect, seed)


__all__ = ["CATEGORY", "INSTALL_HINT", "MissingDataPackage", "ElpvSplit", "available", "poly_cells", "write_elpv_poly"]
