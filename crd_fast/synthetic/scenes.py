"""Defect-free scenes: a woven fabric (periodic), a stone surface (stochastic) and a bottle cap (object).

Each renderer takes a numpy Generator and an image size and returns a :class:`Scene`: a float32 RGB image
in [0, 1] plus what the defect painters need to know about it (where a defect may sit, and layers a
"missing part" defect uncovers). Variation between samples is what a real line would show: a jittered
position and phase, a small rotation, lighting gain and gradient, sensor noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage


@dataclass
class Scene:
    """A rendered defect-free image and the facts defect painters need."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    placement: np.ndarray  # (H, W) bool: where a defect's centre may be placed
    surface: np.ndarray  # (H, W) float32 in [0, 1]: how much each pixel belongs to the inspected part
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # extra layers, e.g. what lies beneath


def smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about ``scale`` pixels wide (low-res noise, bicubic upsampling)."""
    n = int(np.ceil(size / scale)) + 3
    small = ndimage.gaussian_filter(rng.standard_normal((n, n)), 0.7, mode="wrap").astype(np.float32)
    up = int(round(n * scale))
    big = np.asarray(Image.fromarray(small, mode="F").resize((up, up), Image.Resampling.BICUBIC))
    off = rng.integers(0, max(1, up - size), 2)  # random sub-grid offset: no fixed alignment
    out = big[off[0] : off[0] + size, off[1] : off[1] + size]
    return ((out - out.mean()) / (out.std() + 1e-12)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _lighting(rng: np.random.Generator, size: int, strength: float = 0.08) -> np.ndarray:
    """A global gain times a gentle linear gradient in a random direction, (H, W, 1)."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size
    gain = rng.uniform(0.96, 1.04)
    return (gain * (1.0 + strength * rng.uniform(0.3, 1.0) * ramp))[..., None].astype(np.float32)


def _central_box(size: int, margin: float = 0.22) -> np.ndarray:
    # Detectors look at the centre crop (224 of 256); defects stay well inside it.
    box = np.zeros((size, size), dtype=bool)
    lo, hi = int(margin * size), int((1 - margin) * size)
    box[lo:hi, lo:hi] = True
    return box


def _finish(rng: np.random.Generator, image: np.ndarray, noise: float = 0.012) -> np.ndarray:
    image = image + noise * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------ fabric

FABRIC_WARP = np.array([0.22, 0.32, 0.58], dtype=np.float32)  # denim-like blue warp ...
FABRIC_WEFT = np.array([0.78, 0.75, 0.68], dtype=np.float32)  # ... and an off-white weft


def render_fabric(rng: np.random.Generator, size: int) -> Scene:
    """A plain weave: warp and weft threads alternating over and under, jittered phase and small rotation."""
    period = 9.0 * size / 256  # pixels per thread
    yy, xx = _grid(size)
    angle = np.deg2rad(rng.normal(0.0, 1.5))
    c = size / 2
    xr = (xx - c) * np.cos(angle) - (yy - c) * np.sin(angle) + c
    yr = (xx - c) * np.sin(angle) + (yy - c) * np.cos(angle) + c
    # Threads are not perfectly straight: a slow, small displacement field.
    xr = xr + 0.8 * smooth_noise(rng, size, 40.0)
    yr = yr + 0.8 * smooth_noise(rng, size, 40.0)
    u = (xr + rng.uniform(0, 2 * period)) / period
    v = (yr + rng.uniform(0, 2 * period)) / period
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - iu, v - iv
    # Per-thread brightness: some threads are a little lighter or darker.
    warp_gain = 1.0 + 0.06 * rng.standard_normal(4096).astype(np.float32)
    weft_gain = 1.0 + 0.06 * rng.standard_normal(4096).astype(np.float32)
    warp_prof = np.sin(np.pi * fu) ** 0.6 * warp_gain[iu % 4096]
    weft_prof = np.sin(np.pi * fv) ** 0.6 * weft_gain[iv % 4096]
    # Where a thread dives under the other it is shaded towards the crossing.
    warp_val = warp_prof * (0.7 + 0.3 * np.sin(np.pi * fv))
    weft_val = weft_prof * (0.7 + 0.3 * np.sin(np.pi * fu))
    warp_on_top = ((iu + iv) % 2 == 0)[..., None]
    warp_rgb = FABRIC_WARP * (0.3 + 0.7 * warp_val[..., None])
    weft_rgb = FABRIC_WEFT * (0.3 + 0.7 * weft_val[..., None])
    light = _lighting(rng, size)
    image = np.where(warp_on_top, warp_rgb, weft_rgb) * light
    # Beneath a missing weft: warp threads alone over a dark backing.
    bare = (FABRIC_WARP * (0.2 + 0.5 * warp_prof[..., None]) * (warp_prof[..., None] > 0.45) + 0.03) * light
    return Scene(
        image=_finish(rng, image),
        placement=_central_box(size),
        surface=np.ones((size, size), dtype=np.float32),
        layers={"bare": bare.astype(np.float32), "weft_index": iv},
    )


# ------------------------------------------------------------------------------------------- stone

STONE_LIGHT = np.array([0.80, 0.76, 0.70], dtype=np.float32)
STONE_DARK = np.array([0.45, 0.42, 0.40], dtype=np.float32)


def render_stone(rng: np.random.Generator, size: int) -> Scene:
    """A granite-like tile: multi-scale smooth noise between two colours plus dark and light grains."""
    s = size / 256
    field_ = (
        0.5
        + 0.14 * smooth_noise(rng, size, 28 * s)
        + 0.08 * smooth_noise(rng, size, 8 * s)
        + 0.05 * smooth_noise(rng, size, 2.5 * s)
    )
    grains = smooth_noise(rng, size, 2.0 * s)
    t = np.clip(field_, 0, 1)[..., None]
    image = STONE_DARK * (1 - t) + STONE_LIGHT * t
    image = np.where((grains > 2.0)[..., None], image * 0.45, image)  # dark mica grains
    image = np.where((grains < -2.3)[..., None], np.minimum(image * 1.25, 1.0), image)  # light quartz grains
    image = image * _lighting(rng, size)
    return Scene(
        image=_finish(rng, image),
        placement=_central_box(size),
        surface=np.ones((size, size), dtype=np.float32),
    )


# --------------------------------------------------------------------------------------------- cap

CAP_RED = np.array([0.72, 0.10, 0.09], dtype=np.float32)
CAP_PRINT = np.array([0.95, 0.92, 0.85], dtype=np.float32)
BELT_GREY = np.array([0.20, 0.21, 0.22], dtype=np.float32)


def render_cap(rng: np.random.Generator, size: int) -> Scene:
    """A red bottle cap seen from above on a grey belt: knurled rim, groove, printed mark; jittered pose."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.normal(0, 0.01 * size, 2)
    radius = 0.34 * size * (1 + rng.normal(0, 0.008))
    rot = np.deg2rad(rng.uniform(-8, 8))
    dy, dx = yy - cy, xx - cx
    r = np.sqrt(dx * dx + dy * dy)
    phi = np.arctan2(dy, dx)

    belt = BELT_GREY * (1 + 0.08 * smooth_noise(rng, size, 6.0 * size / 256))[..., None]
    # Soft shadow of the cap, offset away from the light.
    light_dir = np.deg2rad(rng.normal(-135, 8))
    sy, sx = -0.03 * size * np.sin(light_dir), -0.03 * size * np.cos(light_dir)
    shadow = ndimage.gaussian_filter(
        (np.hypot(xx - cx - sx, yy - cy - sy) < radius).astype(np.float32), 4.0 * size / 256
    )
    background = belt * (1 - 0.55 * shadow[..., None])

    rel = r / radius
    shade = 1.0 + 0.15 * np.clip(rel, 0, 1) * np.cos(phi - light_dir)
    cap = CAP_RED * shade[..., None]
    knurl = rel > 0.86
    ridges = 0.72 + 0.28 * np.cos(60 * (phi - rot))
    cap = np.where(knurl[..., None], cap * ridges[..., None] * 0.85, cap)
    groove = np.exp(-(((rel - 0.62) * radius) ** 2) / (2 * (1.2 * size / 256) ** 2))
    cap = cap * (1 - 0.55 * groove)[..., None]
    # Printed mark: an arc and a dot; they turn with the cap, so orientation is visible.
    ang = np.angle(np.exp(1j * (phi - rot)))
    arc = (np.abs(rel - 0.36) < 0.045) & (ang > np.deg2rad(20)) & (ang < np.deg2rad(160))
    dot_y, dot_x = cy + 0.36 * radius * np.sin(rot - np.pi / 2), cx + 0.36 * radius * np.cos(rot - np.pi / 2)
    dot = np.hypot(xx - dot_x, yy - dot_y) < 0.08 * radius
    mark = ndimage.gaussian_filter((arc | dot).astype(np.float32), 0.6)[..., None]
    cap = cap * (1 - mark) + CAP_PRINT * shade[..., None] * mark

    alpha = np.clip(radius - r + 0.5, 0, 1).astype(np.float32)  # anti-aliased edge
    light = _lighting(rng, size, strength=0.05)
    cap, background = cap * light, background * light
    image = background * (1 - alpha[..., None]) + cap * alpha[..., None]
    placement = (r < 0.78 * radius) & _central_box(size, 0.15)
    return Scene(
        image=_finish(rng, image),
        placement=placement,
        surface=alpha,
        layers={"background": _finish(rng, background), "center": np.array([cy, cx, radius], dtype=np.float32)},
    )
