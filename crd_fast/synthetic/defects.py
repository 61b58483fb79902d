"""Defect painters: each changes a :class:`Scene`'s image and returns the new image and its exact mask.

A painter draws an opacity map ``alpha`` in [0, 1] and blends a defect look into the image with it; the
mask is ``alpha >= 0.5`` (the pixels that visibly changed), restricted to the inspected part. Line-like
defects (scratches, cracks) are drawn as a centre line and widened with a distance transform, so their
width is exact and anti-aliased.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from .scenes import Scene, smooth_noise

Painter = Callable[[np.random.Generator, Scene], tuple[np.ndarray, np.ndarray]]

MIN_MASK_PIXELS = 12  # a defect smaller than this is redrawn: it would be invisible at 224 px


def _pick_centre(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    ys, xs = np.nonzero(scene.placement)
    k = rng.integers(0, len(ys))
    return np.array([ys[k], xs[k]], dtype=np.float64)


def _stroke(points: np.ndarray, size: int, width: float) -> np.ndarray:
    """Opacity of a polyline (K, 2) of (y, x) points drawn ``width`` pixels wide, anti-aliased."""
    # Densify so consecutive points are at most half a pixel apart, then mark the pixels they hit.
    seg = np.diff(points, axis=0)
    steps = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) * 2)).astype(int)
    dense = [points[:1]]
    for p, d, n in zip(points[:-1], seg, steps):
        dense.append(p + d * (np.arange(1, n + 1)[:, None] / n))
    pts = np.round(np.concatenate(dense)).astype(int)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < size) & (pts[:, 1] >= 0) & (pts[:, 1] < size)]
    line = np.zeros((size, size), dtype=bool)
    line[pts[:, 0], pts[:, 1]] = True
    dist = ndimage.distance_transform_edt(~line)
    return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0).astype(np.float32)


def _blend(image: np.ndarray, look: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.clip(image * (1 - alpha[..., None]) + look * alpha[..., None], 0.0, 1.0).astype(np.float32)


def _result(scene: Scene, image: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return image, (alpha >= 0.5) & (scene.surface >= 0.5)


def scratch(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A thin, slightly curved bright line, as left by a hard tip sliding over the surface."""
    size = scene.image.shape[0]
    centre = _pick_centre(rng, scene)
    length = rng.uniform(0.2, 0.32) * size
    theta = rng.uniform(0, np.pi)
    direction = np.array([np.sin(theta), np.cos(theta)])
    normal = np.array([-direction[1], direction[0]])
    t = np.linspace(-0.5, 0.5, 40)[:, None]
    bend = rng.uniform(-0.12, 0.12) * length * (1 - 4 * t**2)  # a shallow arc
    pts = centre + t * length * direction + bend * normal
    alpha = _stroke(pts, size, width=rng.uniform(3.0, 4.0)) * scene.surface
    # On dark or saturated surfaces a scratch shows bright bare material; on light ones it is a shadowed groove.
    lum = float(scene.image[scene.placement].mean())
    look = np.clip(scene.image * 0.15 + 0.85, 0, 1) if lum < 0.5 else scene.image * 0.2
    return _result(scene, _blend(scene.image, look, alpha), alpha)


def crack(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A dark, wandering line with a few side branches."""
    size = scene.image.shape[0]
    s = size / 256

    def walk(start: np.ndarray, heading: float, n: int) -> np.ndarray:
        turns = np.cumsum(rng.normal(0, 0.22, n))
        headings = heading + turns - np.linspace(0, turns[-1], n) * 0.5  # wander, but keep a main direction
        steps = 2.0 * s * np.stack([np.sin(headings), np.cos(headings)], axis=1)
        return start + np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])

    centre = _pick_centre(rng, scene)
    heading = rng.uniform(0, 2 * np.pi)
    n_main = int(rng.uniform(20, 30))
    half = walk(centre, heading, n_main // 2)
    other = walk(centre, heading + np.pi, n_main - n_main // 2)
    main = np.vstack([other[::-1], half[1:]])
    alpha = _stroke(main, size, width=rng.uniform(2.5, 3.2))
    for _ in range(int(rng.integers(2, 4))):
        k = int(rng.integers(2, len(main) - 2))
        d = main[k + 1] - main[k]
        base = np.arctan2(d[0], d[1]) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        branch = walk(main[k], base, int(rng.uniform(5, 10)))
        alpha = np.maximum(alpha, _stroke(branch, size, width=rng.uniform(2.0, 2.6)))
    alpha = alpha * scene.surface
    look = scene.image * 0.12
    return _result(scene, _blend(scene.image, look, alpha), alpha)


def hole(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A ragged dark opening with a lighter, frayed rim."""
    size = scene.image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = _pick_centre(rng, scene)
    base_r = rng.uniform(0.035, 0.06) * size
    aspect = rng.uniform(0.7, 1.0)
    phi = np.arctan2(yy - cy, xx - cx)
    # A ragged outline: the radius varies with the angle by a few low harmonics.
    ragged = 1 + sum(rng.uniform(0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    rho = np.hypot(xx - cx, (yy - cy) / aspect) / (base_r * ragged)
    inside = np.clip((1 - rho) * base_r + 0.5, 0, 1)
    rim = np.clip(1.0 - np.abs(rho - 1.0) * base_r / 1.5, 0, 1) * (1 - inside)
    depth = 0.05 + 0.05 * np.clip(1 - rho, 0, 1)[..., None]  # darker towards the centre
    image = _blend(scene.image, np.broadcast_to(depth, scene.image.shape), inside * scene.surface)
    image = _blend(image, np.clip(scene.image * 1.35 + 0.1, 0, 1), rim * 0.6 * scene.surface)
    alpha = np.maximum(inside, (rim >= 0.85).astype(np.float32)) * scene.surface
    return _result(scene, image, alpha)


# rust, dark oil, green coolant
STAIN_COLOURS = np.array([[0.55, 0.25, 0.05], [0.10, 0.10, 0.08], [0.15, 0.45, 0.20]], dtype=np.float32)


def stain(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """An irregular colour blob (oil, rust, glue) that tints the surface but keeps its texture."""
    size = scene.image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = _pick_centre(rng, scene)
    radius = rng.uniform(0.055, 0.09) * size
    envelope = 1 - np.hypot(yy - cy, xx - cx) / radius
    blob = (envelope + 0.25 * smooth_noise(rng, size, 0.5 * radius)) > 0.1  # irregular, rarely fragmented
    labels, n = ndimage.label(blob)
    if n > 1:  # keep the piece under the centre (or the largest): one stain, not a spray
        keep = labels[int(cy), int(cx)] or 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        blob = labels == keep
    alpha = ndimage.gaussian_filter(blob.astype(np.float32), 0.8) * scene.surface
    colour = STAIN_COLOURS[rng.integers(0, len(STAIN_COLOURS))]
    strength = rng.uniform(0.85, 0.95)
    # The stain's colour, soaked in and darkening: the surface's texture shows through with less contrast.
    lum = scene.image.mean(axis=2, keepdims=True)
    look = colour * (0.5 + 0.4 * lum)
    return _result(scene, _blend(scene.image, look, alpha * strength), alpha)


def missing_piece(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A piece of the part is gone: the cap broken along a ragged chord, or weft threads torn out of fabric."""
    size = scene.image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if "background" in scene.layers:  # an object: cut a segment off
        cy, cx, radius = (float(v) for v in scene.layers["center"])
        theta = rng.uniform(0, 2 * np.pi)
        along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        cut_at = radius * rng.uniform(0.55, 0.72) + 1.5 * smooth_noise(rng, size, 9.0) * (size / 256)
        # Everything of the cap beyond a ragged chord; the chord stays inside the detector's centre crop.
        alpha = np.clip(along - cut_at + 0.5, 0, 1).astype(np.float32) * scene.surface
        image = _blend(scene.image, scene.layers["background"], alpha)
        return _result(scene, image, alpha)
    if "weft_index" not in scene.layers:
        raise ValueError(
            "a missing-piece defect needs an object (a 'background' layer) or a woven texture (a 'weft_index' layer)"
        )
    # A woven texture: tear weft threads out over a stretch, uncovering the warp and the backing.
    weft_index = scene.layers["weft_index"]
    cy, cx = _pick_centre(rng, scene)
    k0 = weft_index[int(cy), int(cx)]
    n_threads = int(rng.integers(2, 4))  # two or three threads
    length = rng.uniform(0.2, 0.3) * size
    rows = (weft_index >= k0) & (weft_index < k0 + n_threads)
    span = np.clip(length / 2 - np.abs(xx - cx) + 0.5, 0, 1)
    alpha = (rows * span).astype(np.float32)
    # Loose thread ends fray a little past the torn stretch: soften the two ends only.
    alpha = np.maximum(alpha, ndimage.uniform_filter(alpha, (1, 5)) * rows)
    image = _blend(scene.image, scene.layers["bare"], alpha)
    return _result(scene, image, alpha)


PAINTERS: dict[str, Painter] = {
    "scratch": scratch,
    "crack": crack,
    "hole": hole,
    "stain": stain,
    "missing": missing_piece,
}
