"""Write a synthetic data set in the MVTec AD layout, deterministic by seed.

    root/<category>/train/good/000.png ...
    root/<category>/test/good/000.png ...
    root/<category>/test/<defect>/000.png ...
    root/<category>/ground_truth/<defect>/000_mask.png   (0 / 255, same size as the image)

Every image has its own random stream derived from (seed, category, split, defect, index), so the same
seed gives byte-identical files, and changing one count does not change the other images.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..io.atomic import atomic_write
from ..io.safety import check_outputs
from .defects import MIN_MASK_PIXELS, PAINTERS
from .scenes import Scene, render_cap, render_fabric, render_stone

PathLike = Union[str, os.PathLike]

MARKER = ".crd_fast_synthetic.json"  # identifies a folder this module wrote (and may overwrite)


@dataclass(frozen=True)
class CategorySpec:
    """One synthetic category: what it looks like and which defects it can have."""

    name: str
    kind: str  # "texture" or "object"
    render: Callable[[np.random.Generator, int], Scene]
    defects: tuple[str, ...]
    description: str


CATEGORIES: dict[str, CategorySpec] = {
    "fabric": CategorySpec(
        "fabric",
        "texture",
        render_fabric,
        ("hole", "stain", "scratch", "missing"),
        "plain-weave denim-like fabric (periodic texture)",
    ),
    "stone": CategorySpec(
        "stone",
        "texture",
        render_stone,
        ("crack", "stain", "hole", "scratch"),
        "granite-like stone tile (stochastic texture)",
    ),
    "cap": CategorySpec(
        "cap",
        "object",
        render_cap,
        ("scratch", "crack", "stain", "missing"),
        "red bottle cap on a conveyor belt (object with a fixed layout)",
    ),
}
DEFAULT_CATEGORIES = ("fabric", "cap")

_SPLITS = {"train": 1, "test": 2}


def _rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process and would break determinism.
    key = [int(seed), zlib.crc32(category.encode()), _SPLITS[split], zlib.crc32(defect.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


def render_sample(
    category: str, size: int = 256, seed: int = 0, defect: Optional[str] = None, index: int = 0, split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of ``category``: ``(image (H, W, 3) uint8, mask (H, W) bool)``.

    ``defect=None`` gives a defect-free image and an all-False mask. The result equals the file
    :func:`generate_dataset` writes for the same seed, category, split, defect type and index.
    """
    spec = _spec(category)
    if defect is not None and defect not in spec.defects:
        raise ValueError(f"category {category!r} has no defect type {defect!r}; choose from {list(spec.defects)}")
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    rng = _rng(seed, category, split, defect or "good", index)
    scene = spec.render(rng, size)
    if defect is None:
        return _to_uint8(scene.image), np.zeros((size, size), dtype=bool)
    for _ in range(20):  # redraw the rare defect that lands almost entirely off the part
        image, mask = PAINTERS[defect](rng, scene)
        if mask.sum() >= MIN_MASK_PIXELS * (size / 256) ** 2:
            return _to_uint8(image), mask
    raise RuntimeError(f"could not place a visible {defect!r} defect on {category!r} (index {index})")


def _spec(category: str) -> CategorySpec:
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; choose from {sorted(CATEGORIES)}")
    return CATEGORIES[category]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


@dataclass
class SyntheticDataset:
    """What :func:`generate_dataset` wrote: the root folder and, per category, the files of each split."""

    root: Path
    categories: tuple[str, ...]
    files: dict[str, dict[str, list[Path]]] = field(default_factory=dict)  # category -> "train/good" etc. -> paths

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of images per category and folder, e.g. ``{"cap": {"train/good": 30, "test/crack": 3}}``."""
        return {c: {k: len(v) for k, v in folders.items()} for c, folders in self.files.items()}


def check_generated_folders(root: PathLike, categories: Sequence[str]) -> None:
    """Refuse (FileExistsError) if a category folder exists under ``root`` that this generator did not write (no
    marker file): its contents would be deleted."""
    for category in categories:
        cat_dir = Path(root) / category
        if os.path.lexists(cat_dir) and not (cat_dir.is_dir() and (cat_dir / MARKER).is_file()):
            raise FileExistsError(
                f"{cat_dir} exists and was not written by crd_fast's generator; refusing to overwrite it"
            )


def generate_dataset(
    root: PathLike,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    n_train: int = 30,
    n_test_good: int = 10,
    n_test_defect: int = 12,
    size: int = 256,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> SyntheticDataset:
    """Write an MVTec AD-layout data set of synthetic images under ``root``.

    Each category gets ``n_train`` defect-free training images, ``n_test_good`` defect-free test images and
    ``n_test_defect`` defective test images, spread round-robin over the category's defect types, with
    exact 0/255 masks. A category folder that already exists is replaced if this function wrote it
    (it holds the marker file), and refused otherwise, so user data is never deleted.
    ``progress(done, total)`` is called after every image.
    """
    if isinstance(categories, str):
        categories = (categories,)
    categories = tuple(categories)
    if not categories:
        raise ValueError("categories is empty; choose from " + ", ".join(sorted(CATEGORIES)))
    for c in categories:
        _spec(c)
    for name, value, least in (
        ("n_train", n_train, 1),
        ("n_test_good", n_test_good, 1),
        ("n_test_defect", n_test_defect, 1),
    ):
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    root = Path(root)
    check_outputs(folders=[root / c for c in categories])
    check_generated_folders(root, categories)  # all of them before any is replaced
    total = len(categories) * (n_train + n_test_good + n_test_defect)
    done = 0
    result = SyntheticDataset(root=root, categories=categories)
    for category in categories:
        spec = CATEGORIES[category]
        cat_dir = root / category
        if cat_dir.exists():
            shutil.rmtree(cat_dir)
        files: dict[str, list[Path]] = {}
        jobs: list[tuple[str, str, Optional[str], int]] = []  # (folder, split, defect, index)
        jobs += [("train/good", "train", None, i) for i in range(n_train)]
        jobs += [("test/good", "test", None, i) for i in range(n_test_good)]
        per_type = {d: 0 for d in spec.defects}
        for k in range(n_test_defect):
            d = spec.defects[k % len(spec.defects)]
            jobs.append((f"test/{d}", "test", d, per_type[d]))
            per_type[d] += 1
        cat_dir.mkdir(parents=True)
        _write_marker(cat_dir, spec, n_train, n_test_good, n_test_defect, size, seed)
        for folder, split, defect, index in jobs:
            image, mask = render_sample(category, size=size, seed=seed, defect=defect, index=index, split=split)
            path = cat_dir / folder / f"{index:03d}.png"
            _write_png(path, image)
            files.setdefault(folder, []).append(path)
            if defect is not None:
                _write_png(cat_dir / "ground_truth" / defect / f"{index:03d}_mask.png", mask.astype(np.uint8) * 255)
            done += 1
            if progress is not None:
                progress(done, total)
        result.files[category] = files
    return result


def _write_marker(
    cat_dir: Path, spec: CategorySpec, n_train: int, n_test_good: int, n_test_defect: int, size: int, seed: int
) -> None:
    info = {
        "generator": "crd_fast.synthetic",
        "category": spec.name,
        "kind": spec.kind,
        "description": spec.description,
        "defect_types": list(spec.defects),
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "size": size,
        "seed": seed,
    }
    with atomic_write(cat_dir / MARKER) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
