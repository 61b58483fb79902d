"""Pseudo-defects on real defect-free images, for choosing settings without defect labels.

Each kind takes a numpy Generator, an (H, W, 3) float32 image in [0, 1] and a list of other defect-free
images (the donors of cut-and-paste), and returns the changed image and its bool mask. They are subtle on
purpose: defects that every setting finds (dark blotches, bold scratches) score ~1.0 everywhere and cannot
tell settings apart (docs/DESIGN.md "Position-aware CRD"). ``make_pseudo_defects(strength=...)`` multiplies the
painted change: the detector's choice of lam_rel uses them 4x stronger, where subtle ones go unseen by a weak
backbone (docs/DESIGN.md "Label-free lam"). Sizes are in pixels of a ~224 px image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from .defects import PAINTERS
from .scenes import Scene

PseudoPainter = Callable[[np.random.Generator, np.ndarray, Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def _disc(
    rng: np.random.Generator, shape: tuple[int, int], d_min: float, d_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """A soft ellipse (alpha in [0, 1]) of diameter in [d_min, d_max] px at a random place; and alpha >= 0.5."""
    h, w = shape
    diam = rng.uniform(d_min, d_max)
    aspect = rng.uniform(0.6, 1.0)
    cy, cx = rng.uniform(diam, h - diam), rng.uniform(diam, w - diam)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / aspect
    alpha = np.clip(diam / 2 - np.hypot(u, v) + 0.5, 0.0, 1.0).astype(np.float32)
    return alpha, alpha >= 0.5


def _apply(image: np.ndarray, changed: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.clip(image + alpha[..., None] * (changed - image), 0.0, 1.0).astype(np.float32)


def darker_spot(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A small spot (6-20 px) 5-15% darker or brighter."""
    alpha, mask = _disc(rng, image.shape[:2], 6, 20)
    gain = 1.0 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.15)
    return _apply(image, image * gain, alpha), mask


def faint_line(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A thin straight line (1.5-3 px wide, 20-60 px long) 10-25% darker."""
    h, w = image.shape[:2]
    length = rng.uniform(20, 60)
    theta = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(length / 2, h - length / 2), rng.uniform(length / 2, w - length / 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    across = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    width = rng.uniform(1.5, 3.0)
    alpha = np.clip(width / 2 - np.abs(across) + 0.5, 0, 1) * np.clip(length / 2 - np.abs(along) + 0.5, 0, 1)
    alpha = alpha.astype(np.float32)
    return _apply(image, image * (1.0 - rng.uniform(0.10, 0.25)), alpha), alpha >= 0.5


def cut_paste(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A 10-28 px patch of another defect-free image, taken from elsewhere, pasted with a soft edge."""
    h, w = image.shape[:2]
    donor = donors[int(rng.integers(0, len(donors)))] if len(donors) else image
    size = int(rng.uniform(10, 28))
    sy, sx = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
    for _ in range(20):  # a source place away from the target, so the pasted content is out of place
        ty, tx = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        if abs(ty - sy) + abs(tx - sx) > size:
            break
    changed = image.copy()
    changed[ty : ty + size, tx : tx + size] = donor[sy : sy + size, sx : sx + size]
    alpha = np.zeros((h, w), dtype=np.float32)
    alpha[ty : ty + size, tx : tx + size] = 1.0
    alpha = ndimage.gaussian_filter(alpha, 1.0)
    return _apply(image, changed, alpha), alpha >= 0.5


def local_blur(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A 12-30 px region blurred (sigma 1.5-3 px)."""
    alpha, mask = _disc(rng, image.shape[:2], 12, 30)
    blurred = ndimage.gaussian_filter(image, (rng.uniform(1.5, 3.0),) * 2 + (0,))
    return _apply(image, blurred, alpha), mask


def local_noise(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A 12-30 px region with added grey noise (std 0.03-0.06)."""
    alpha, mask = _disc(rng, image.shape[:2], 12, 30)
    noise = rng.normal(0.0, rng.uniform(0.03, 0.06), image.shape[:2]).astype(np.float32)[..., None]
    return _apply(image, image + noise, alpha), mask


def faint_painter(name: str, strength: tuple[float, float] = (0.15, 0.35)) -> PseudoPainter:
    """A painter of crd_fast/synthetic/defects.py blended at a low opacity (a faint scratch, crack, ...)."""
    painter = PAINTERS[name]

    def paint(
        rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        margin = np.zeros((h, w), dtype=bool)
        margin[h // 8 : h - h // 8, w // 8 : w - w // 8] = True
        scene = Scene(image=image, placement=margin, surface=np.ones((h, w), dtype=np.float32))
        painted, mask = painter(rng, scene)
        return _apply(image, painted, np.full((h, w), rng.uniform(*strength), dtype=np.float32)), mask

    paint.__name__ = f"faint_{name}"
    return paint


PSEUDO_DEFECTS: dict[str, PseudoPainter] = {
    "spot": darker_spot,
    "line": faint_line,
    "cutpaste": cut_paste,
    "blur": local_blur,
    "noise": local_noise,
    "scratch": faint_painter("scratch"),
    "crack": faint_painter("crack"),
}


def make_pseudo_defects(
    rng: np.random.Generator,
    images: Sequence[np.ndarray],
    donors: Sequence[np.ndarray],
    kinds: Sequence[str] = tuple(PSEUDO_DEFECTS),
    strength: float = 1.0,
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """One pseudo-defect per image, kinds taken in turn: (images, masks, kind names).

    ``strength`` multiplies each painted change (image + strength * (painted - image), clipped to [0, 1]); the
    masks are the painters' own. 1 is the kinds as described above.
    """
    unknown = [k for k in kinds if k not in PSEUDO_DEFECTS]
    if unknown or not kinds:
        raise ValueError(f"unknown pseudo-defect kind(s) {unknown}; choose from {sorted(PSEUDO_DEFECTS)}")
    if not (isinstance(strength, (int, float)) and np.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a positive finite number, got {strength!r}")
    out, masks, names = [], [], []
    for i, image in enumerate(images):
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i} must be (H, W, 3) float in [0, 1], got shape {image.shape}")
        kind = kinds[i % len(kinds)]
        changed, mask = PSEUDO_DEFECTS[kind](rng, image, donors)
        if not mask.any():  # too faint to leave a mask: try once more
            changed, mask = PSEUDO_DEFECTS[kind](rng, image, donors)
        if strength != 1.0:
            changed = np.clip(image + strength * (changed - image), 0.0, 1.0).astype(np.float32)
        out.append(changed)
        masks.append(mask)
        names.append(kind)
    return out, masks, names
