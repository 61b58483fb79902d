"""Pseudo-defects on real defect-free images, for choosing settings without defect labels.

Each kind takes a numpy Generator, an (H, W, 3) float32 image in [0, 1] and a list of other defect-free
images (the donors of cut-and-paste), and returns the changed image and its bool mask. They are subtle on
purpose: defects that every setting finds (dark blotches, bold scratches) score ~1.0 everywhere and cannot
tell settings apart (docs/DESIGN.md "Position-aware CRD"). ``make_pseudo_defects(strength=...)`` multiplies the
painted change: the detector's choice of lam_rel uses them 4x stronger, where subtle ones go unseen by a weak
backbone, pooled with the defect-like kinds at 2x (docs/DESIGN.md "Label-free lam"). Sizes are in pixels of a
~224 px image, except the defect-like kinds (``DEFECT_LIKE``: cracks, dark regions, finger breaks, blended
patches, shading), sized relative to the image side.
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


# -- defect-like kinds: real-looking strength and scale, sizes relative to the image side ----------------------
def _side(image: np.ndarray) -> float:
    return float(min(image.shape[:2]))


def polyline_alpha(points: np.ndarray, shape: tuple[int, int], width: float) -> np.ndarray:
    """Opacity (H, W) of a polyline (K, 2) of (y, x) points drawn ``width`` px wide, anti-aliased: 1 within
    width / 2 of the line's centre pixels, falling to 0 over one more pixel."""
    h, w = shape
    seg = np.diff(points, axis=0)
    steps = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) * 2)).astype(int)
    dense = [points[:1]] + [p + d * (np.arange(1, n + 1)[:, None] / n) for p, d, n in zip(points[:-1], seg, steps)]
    pts = np.round(np.concatenate(dense)).astype(int)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)]
    line = np.zeros((h, w), dtype=bool)
    line[pts[:, 0], pts[:, 1]] = True
    if not line.any():
        return np.zeros((h, w), dtype=np.float32)
    dist = ndimage.distance_transform_edt(~line)
    return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0).astype(np.float32)


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float, step: float) -> np.ndarray:
    """A wandering path of about ``length`` px from ``start``, keeping its main ``heading`` (radians)."""
    n = max(2, int(length / step))
    turns = np.cumsum(rng.normal(0.0, 0.18, n))
    headings = heading + turns - np.linspace(0.0, turns[-1], n) * 0.7
    steps = step * np.stack([np.sin(headings), np.cos(headings)], axis=1)
    return start + np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def dark_crack(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A thin (0.8-1.6% of the side) wandering crack 35-90% of the side long, 30-60% darker, with 0-2 branches."""
    h, w = image.shape[:2]
    side = _side(image)
    centre = np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w])
    heading = rng.uniform(0, 2 * np.pi)
    length, step = rng.uniform(0.35, 0.9) * side, 0.02 * side
    main = np.vstack(
        [_walk(rng, centre, heading + np.pi, length / 2, step)[::-1], _walk(rng, centre, heading, length / 2, step)[1:]]
    )
    alpha = polyline_alpha(main, (h, w), rng.uniform(0.008, 0.016) * side)
    for _ in range(int(rng.integers(0, 3))):
        k = int(rng.integers(1, len(main) - 1))
        d = main[k + 1] - main[k]
        turn = rng.choice([-1, 1]) * rng.uniform(0.4, 1.2)
        branch = _walk(rng, main[k], np.arctan2(d[0], d[1]) + turn, rng.uniform(0.1, 0.3) * side, step)
        alpha = np.maximum(alpha, polyline_alpha(branch, (h, w), rng.uniform(0.006, 0.012) * side))
    return _apply(image, image * (1.0 - rng.uniform(0.3, 0.6)), alpha), alpha >= 0.5


def dark_region(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A region cut off from one image edge by a wandering boundary (10-35% of the side deep), 20-50% darker,
    with a soft edge: an inactive area behind a crack, a low-frequency change."""
    h, w = image.shape[:2]
    side = _side(image)
    edge = int(rng.integers(0, 4))  # 0 top, 1 bottom, 2 left, 3 right
    across = w if edge < 2 else h  # the boundary runs along this axis
    depth = rng.uniform(0.1, 0.35) * side
    t = np.arange(across, dtype=np.float32)
    knots = rng.normal(0.0, 0.25 * depth, 6)
    wobble = np.interp(t, np.linspace(0, across - 1, 6), knots) + rng.uniform(-1, 1) * 0.3 * depth * (t / across - 0.5)
    boundary = np.clip(depth + wobble, 0.03 * side, 0.5 * side)  # distance from the edge, per position along it
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inward = (yy, h - 1 - yy, xx, w - 1 - xx)[edge]
    along = (xx if edge < 2 else yy).astype(int)
    alpha = np.clip((boundary[along] - inward) / max(1.0, 0.015 * side) + 0.5, 0.0, 1.0).astype(np.float32)
    return _apply(image, image * (1.0 - rng.uniform(0.2, 0.5)), alpha), alpha >= 0.5


def finger_breaks(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """3-10 short dark streaks (3-10% of the side long, 25-50% darker) side by side along one image axis, within
    a box 15-35% of the side: interrupted fingers of a solar cell, a cluster of small high-frequency changes."""
    h, w = image.shape[:2]
    side = _side(image)
    box = rng.uniform(0.15, 0.35) * side
    y0, x0 = rng.uniform(0, h - box), rng.uniform(0, w - box)
    vertical = bool(rng.integers(0, 2))
    alpha = np.zeros((h, w), dtype=np.float32)
    for _ in range(int(rng.integers(3, 11))):
        length = rng.uniform(0.03, 0.1) * side
        y, x = y0 + rng.uniform(0, box), x0 + rng.uniform(0, box)
        end = np.array([y + length, x]) if vertical else np.array([y, x + length])
        stroke = polyline_alpha(np.array([[y, x], end]), (h, w), rng.uniform(0.008, 0.013) * side)
        alpha = np.maximum(alpha, stroke)
    return _apply(image, image * (1.0 - rng.uniform(0.25, 0.5)), alpha), alpha >= 0.5


def blended_patch(
    rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A patch 12-30% of the side, cut from another image elsewhere, flipped or turned at random and blended at
    opacity 0.6-1 inside a feathered ellipse: texture out of place, a mid-frequency change."""
    h, w = image.shape[:2]
    side = _side(image)
    donor = np.asarray(donors[int(rng.integers(0, len(donors)))] if len(donors) else image, dtype=np.float32)
    size = max(4, int(rng.uniform(0.12, 0.3) * side))
    sy, sx = int(rng.integers(0, donor.shape[0] - size + 1)), int(rng.integers(0, donor.shape[1] - size + 1))
    piece = donor[sy : sy + size, sx : sx + size]
    piece = np.rot90(piece, int(rng.integers(0, 4)))
    if rng.integers(0, 2):
        piece = piece[::-1]
    ty, tx = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    changed = image.copy()
    changed[ty : ty + size, tx : tx + size] = piece
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((yy - ty - size / 2) / (size / 2), (xx - tx - size / 2) / (size / 2))
    feather = max(0.1, 0.03 * side / (size / 2))
    alpha = (np.clip((1.0 - r) / feather, 0.0, 1.0) * rng.uniform(0.6, 1.0)).astype(np.float32)
    return _apply(image, changed, alpha), alpha >= 0.5 * alpha.max()


def shading(rng: np.random.Generator, image: np.ndarray, donors: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth blob (Gaussian, sigma 6-20% of the side), 15-35% darker (three times in four) or brighter at its
    centre: the lowest-frequency change."""
    h, w = image.shape[:2]
    side = _side(image)
    sigma = rng.uniform(0.06, 0.2) * side
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    alpha = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
    gain = 1.0 + (1 if rng.uniform() < 0.25 else -1) * rng.uniform(0.15, 0.35)
    return _apply(image, image * gain, alpha), alpha >= 0.5


#: Defect-like pseudo-defects, at real defects' strength and scale (``make_pseudo_defects``'s default kinds are the
#: faint ``PSEUDO_DEFECTS``; the detector's choice of lam_rel pools both, crd_fast/selection/held_out.py
#: ``PSEUDO_DESIGNS``; how these choose lam_rel: bench/RESULTS.md "Choosing lam_rel without labels").
DEFECT_LIKE: dict[str, PseudoPainter] = {
    "dark_crack": dark_crack,
    "dark_region": dark_region,
    "finger_breaks": finger_breaks,
    "blended_patch": blended_patch,
    "shading": shading,
}
#: Every kind ``make_pseudo_defects`` paints by name.
ALL_PSEUDO_DEFECTS: dict[str, PseudoPainter] = {**PSEUDO_DEFECTS, **DEFECT_LIKE}


def make_pseudo_defects(
    rng: np.random.Generator,
    images: Sequence[np.ndarray],
    donors: Sequence[np.ndarray],
    kinds: Sequence[str] = tuple(PSEUDO_DEFECTS),
    strength: float = 1.0,
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """One pseudo-defect per image, kinds taken in turn: (images, masks, kind names).

    ``kinds``: names of ``ALL_PSEUDO_DEFECTS`` (default: the faint ``PSEUDO_DEFECTS``). ``strength`` multiplies
    each painted change (image + strength * (painted - image), clipped to [0, 1]); the masks are the painters'
    own. 1 is the kinds as described above.
    """
    unknown = [k for k in kinds if k not in ALL_PSEUDO_DEFECTS]
    if unknown or not kinds:
        raise ValueError(f"unknown pseudo-defect kind(s) {unknown}; choose from {sorted(ALL_PSEUDO_DEFECTS)}")
    if not (isinstance(strength, (int, float)) and np.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a positive finite number, got {strength!r}")
    out, masks, names = [], [], []
    for i, image in enumerate(images):
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i} must be (H, W, 3) float in [0, 1], got shape {image.shape}")
        kind = kinds[i % len(kinds)]
        changed, mask = ALL_PSEUDO_DEFECTS[kind](rng, image, donors)
        if not mask.any():  # too faint to leave a mask: try once more
            changed, mask = ALL_PSEUDO_DEFECTS[kind](rng, image, donors)
        if strength != 1.0:
            changed = np.clip(image + strength * (changed - image), 0.0, 1.0).astype(np.float32)
        out.append(changed)
        masks.append(mask)
        names.append(kind)
    return out, masks, names
