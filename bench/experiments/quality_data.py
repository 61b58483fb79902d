"""Features for quality.py: the elpv polycrystalline cells, a seeded split, pseudo-defects, cached embeddings.

Development data: the registry package ``elpv-dataset`` (real electroluminescence images of solar cells,
300 x 300 grayscale, each with a defect probability). Only the polycrystalline cells (type "poly") are
used; good = probability 0, defective = probability 1. The monocrystalline cells stay out of all tuning.

    pip install elpv-dataset        # or: pip install crd-fast[quality]

Everything the methods compare is computed from one cached feature file per backbone:
train (N, P, d), test (M, P, d) with labels, and the label-free validation set (clean held-out training
images and their pseudo-defect versions, with pseudo-masks on the patch grid). No test label or test
image is ever seen by the validation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crd_fast.core.embedding import embed_patches
from crd_fast.core.lam_selection import grid_masks
from crd_fast.features.backbone import FeatureExtractor, input_normalisation
from crd_fast.features.preprocess import Preprocess
from crd_fast.selection.held_out import PSEUDO_STRENGTH
from crd_fast.synthetic.pseudo import make_pseudo_defects

BACKBONES = {
    # name: (backbone, layers, weights)
    "vgg16_hed": ("vgg16", ("block4", "block5"), "hed"),
    "wrn50_random": ("wide_resnet50_2", ("layer2", "layer3"), "random"),
    # ImageNet weights from the registry (packaged: crd-fast depends on them), no download; input scaled to [-1, 1]
    "lite0_imagenet": ("efficientnet_lite0", ("stage3", "stage5"), "imagenet"),
}


@dataclass
class Split:
    train: np.ndarray  # indices into the elpv arrays
    held_out: np.ndarray  # the last training images, reused (clean and with pseudo-defects) for validation
    test_good: np.ndarray
    test_bad: np.ndarray


def load_poly(seed: int, n_train: int, n_test_good: int, n_test_bad: int, n_held_out: int):
    """(images (K, 300, 300) uint8, Split) for the polycrystalline cells, seeded."""
    from elpv_dataset.utils import load_dataset

    images, probs, types = load_dataset()
    poly = types == "poly"
    good = np.flatnonzero(poly & (probs == 0.0))
    bad = np.flatnonzero(poly & (probs == 1.0))
    rng = np.random.default_rng(seed)
    good, bad = rng.permutation(good), rng.permutation(bad)
    if n_train + n_test_good > len(good) or n_test_bad > len(bad):
        raise SystemExit(
            f"asked for {n_train}+{n_test_good} good and {n_test_bad} defective cells; "
            f"the poly set has {len(good)} and {len(bad)}"
        )
    train = good[:n_train]
    split = Split(train, train[n_train - n_held_out :], good[n_train : n_train + n_test_good], bad[:n_test_bad])
    return images, split


def _unit(images: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """(K, H, W) grayscale or (K, H, W, 3) RGB uint8 -> (K, 3, s, s) float [0, 1] after resize and crop."""
    x = torch.from_numpy(images).float().div(255.0)
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return pre.geometric(x).clamp(0, 1)


@torch.inference_mode()
def _embed(extractor: FeatureExtractor, pre: Preprocess, unit: torch.Tensor, batch: int):
    """(K, 3, s, s) [0, 1] -> ((K, P, d) float16 concat embeddings, grid (h, w))."""
    out = []
    for i in range(0, len(unit), batch):
        emb = embed_patches(extractor(pre.normalize(unit[i : i + batch])), "concat")
        b, d, h, w = emb.shape
        out.append(emb.permute(0, 2, 3, 1).reshape(b, h * w, d).half().numpy())
    return np.concatenate(out), (h, w)


def elpv_images(args):
    """(train uint8, test uint8, test labels) of the seeded poly split."""
    images, split = load_poly(args.seed, args.n_train, args.n_test_good, args.n_test_bad, args.n_held_out)
    test_idx = np.concatenate([split.test_good, split.test_bad])
    labels = np.r_[np.zeros(len(split.test_good)), np.ones(len(split.test_bad))].astype(np.int8)
    return images[split.train], images[test_idx], labels


def synthetic_images(category: str, seed: int, n_train: int = 30, n_good: int = 10, n_bad: int = 12, size: int = 256):
    """The generated demo category (the demo's default counts), rendered in memory."""
    from crd_fast.synthetic.dataset import CATEGORIES, render_sample

    defects = CATEGORIES[category].defects
    train = np.stack([render_sample(category, size, seed, None, i, "train")[0] for i in range(n_train)])
    good = [render_sample(category, size, seed, None, i, "test")[0] for i in range(n_good)]
    bad = [render_sample(category, size, seed, defects[i % len(defects)], i, "test")[0] for i in range(n_bad)]
    return train, np.stack(good + bad), np.r_[np.zeros(n_good), np.ones(n_bad)].astype(np.int8)


def _pseudo_features(extractor, pre: Preprocess, train_unit: torch.Tensor, n_held_out: int, grid, args) -> dict:
    """Pseudo-defect versions of the last ``n_held_out`` training images (the other training images are the
    cut-and-paste donors), at the detector's strength (crd_fast/selection/held_out.py PSEUDO_STRENGTH)."""
    n_fit = len(train_unit) - n_held_out
    donors = [t.permute(1, 2, 0).numpy() for t in train_unit[:n_fit]]
    held = [t.permute(1, 2, 0).numpy() for t in train_unit[n_fit:]]
    pseudo_imgs, pseudo_masks, kinds = make_pseudo_defects(
        np.random.default_rng(args.seed + 1), held, donors, strength=PSEUDO_STRENGTH
    )
    pseudo_unit = torch.from_numpy(np.stack(pseudo_imgs)).permute(0, 3, 1, 2).contiguous()
    pseudo, _ = _embed(extractor, pre, pseudo_unit, args.batch)
    return {
        "pseudo": pseudo,
        "pseudo_masks": grid_masks(np.stack(pseudo_masks), grid),
        "pseudo_kinds": np.array(kinds),
        "pseudo_strength": np.array(PSEUDO_STRENGTH),
    }


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)


def build_features(
    key: str, dataset: str, images_fn, resize: int, crop: int, n_held_out: int, args, cache: Path
) -> dict:
    """Extract (or load from ``cache``) every feature set the methods need for backbone ``key``.

    The last ``n_held_out`` training images are the label-free validation's clean images; pseudo-defect
    versions of them (at the detector's PSEUDO_STRENGTH, cached in a file of their own) are made with the other
    training images as cut-and-paste donors.
    """
    path = cache / f"{key}_{dataset}_px{resize}-{crop}_h{n_held_out}.npz"
    pseudo_path = cache / f"{key}_{dataset}_px{resize}-{crop}_h{n_held_out}_pseudo-x{PSEUDO_STRENGTH:g}.npz"
    data = dict(np.load(path, allow_pickle=False)) if path.is_file() else None
    pseudo = dict(np.load(pseudo_path, allow_pickle=False)) if pseudo_path.is_file() else None
    if data is None or pseudo is None:
        train_imgs, test_imgs, labels = images_fn()
        backbone, layers, weights = BACKBONES[key]
        mean, std = input_normalisation(weights, backbone)
        pre = Preprocess(resize, crop, mean, std)
        extractor = FeatureExtractor(backbone, layers, weights, seed=args.seed)
        t0 = time.time()
        train_unit = _unit(train_imgs, pre)
        if data is None:
            train, grid = _embed(extractor, pre, train_unit, args.batch)
            test, _ = _embed(extractor, pre, _unit(test_imgs, pre), args.batch)
            data = {
                "train": train,
                "test": test,
                "labels": labels,
                "n_held_out": np.array(n_held_out),
                "grid": np.array(grid),
                "extract_seconds": np.array(time.time() - t0),
            }
            _save(path, data)
        pseudo = _pseudo_features(extractor, pre, train_unit, n_held_out, tuple(int(v) for v in data["grid"]), args)
        _save(pseudo_path, pseudo)
    data.update(pseudo)  # (a cache file written before the pseudo-defects had their own holds strength-1 ones)
    data["grid"] = tuple(int(v) for v in data["grid"])
    return data
