"""Procedural fetal-ultrasound-like phantoms with exact masks, for tests and the demo.

Each sample is a deterministic function of (seed, index): an ultrasound sector with
speckle, a structure per plane (skull ring with midline and ventricles for ``brain``,
a thinner wall with stomach bubble and spine for ``abdomen``, a ring with heart for
``thorax``, a bright bone with shadow for ``femur``), acoustic shadows, and varied size,
position and rotation. The annotation is drawn like the real ones, as an ellipse outline
(optionally with gaps, optionally crossing the border), and the exact filled mask is the
region inside the outline's outer edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import field_validator
from scipy import ndimage

from sonosynth.datasets.geometry import Ellipse
from sonosynth.datasets.labels import PLANES
from sonosynth.infra.config import Config

MASKED_PLANES = ("brain", "abdomen", "thorax")


class PhantomConfig(Config):
    """Procedural phantom cohort (``--cohort phantom``)."""

    num: int = 64
    """Number of phantom samples."""
    height: int = 256
    """Image height in pixels."""
    width: int = 256
    """Image width in pixels."""
    seed: int = 0
    """Seed; sample i is the same for the same (seed, i) whatever num is."""
    planes: list[str] = ["brain"]
    """Plane classes to draw, cycled over samples; choose from brain, abdomen, femur, thorax."""
    images_per_patient: int = 2
    """Consecutive samples sharing one patient id (to exercise patient-disjoint splits)."""
    outline_px: int = 3
    """Thickness of the drawn annotation outline."""
    gap_prob: float = 0.25
    """Probability that an outline is drawn with gaps (as after resizing)."""
    border_prob: float = 0.15
    """Probability that the ellipse crosses the image border."""

    @field_validator("planes")
    @classmethod
    def _known_planes(cls, planes: list[str]) -> list[str]:
        bad = [p for p in planes if p not in PLANES or p == "other"]
        if bad or not planes:
            raise ValueError(f"unknown phantom planes {bad}; choose from brain, abdomen, femur, thorax")
        return planes

    @field_validator("num", "height", "width", "images_per_patient", "outline_px")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v


@dataclass
class PhantomSample:
    index: int
    image: np.ndarray
    """uint8 HxW grayscale."""
    outline: np.ndarray | None
    """uint8 0/255 annotation outline as a real cohort would ship it (None for femur)."""
    filled: np.ndarray | None
    """uint8 0/255 exact filled region (the segmentation ground truth)."""
    plane: str
    patient_id: str
    ellipse: Ellipse | None
    """The annotation's centre-line ellipse."""


def _speckle(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    noise = rng.rayleigh(1.0, shape)
    return ndimage.gaussian_filter(noise, 0.8) * scale


def _sector(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    half = math.radians(rng.uniform(35, 45))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    apex_y = -0.08 * h
    ang = np.arctan2(xx - w / 2, yy - apex_y)
    r = np.hypot(xx - w / 2, yy - apex_y)
    return (np.abs(ang) <= half) & (r <= 1.12 * h)


def _pick_ellipse(rng: np.random.Generator, h: int, w: int, border: bool, plane: str) -> Ellipse:
    size = min(h, w)
    a = rng.uniform(0.24, 0.36) * size
    b = a * (rng.uniform(0.72, 0.9) if plane == "brain" else rng.uniform(0.85, 1.0))
    theta = rng.uniform(-math.pi / 2, math.pi / 2)
    if border:
        side = rng.integers(4)
        cx = [a * 0.55, w - a * 0.55, w / 2, w / 2][side] + rng.uniform(-5, 5)
        cy = [h / 2, h / 2, b * 0.55, h - b * 0.55][side] + rng.uniform(-5, 5)
    else:
        m = a + 4
        cx = rng.uniform(min(m, w / 2), max(w - m, w / 2))
        cy = rng.uniform(min(m, h / 2), max(h - m, h / 2))
    return Ellipse(float(cx), float(cy), float(a), float(b), float(theta))


def _ring(e: Ellipse, shape, inner: float, outer: float) -> np.ndarray:
    return e.inside(shape, grow=outer) & ~e.inside(shape, grow=inner)


def _angles(e: Ellipse, shape) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    c, s = math.cos(e.theta), math.sin(e.theta)
    dx, dy = xx - e.cx, yy - e.cy
    return np.arctan2((-dx * s + dy * c) / e.b, (dx * c + dy * s) / e.a)


def _draw_structure(img: np.ndarray, e: Ellipse, plane: str, rng: np.random.Generator) -> None:
    shape = img.shape
    if plane == "femur":
        bone = Ellipse(e.cx, e.cy, e.a, max(3.0, e.a * 0.06), e.theta).inside(shape)
        img[bone] = rng.uniform(200, 245)
        below = ndimage.shift(bone.astype(float), (e.a * 0.25, 0), order=0) > 0
        img[below & ~bone] *= 0.35
        return
    inside = e.inside(shape)
    img[inside] *= 0.75 if plane == "brain" else 0.9
    wall = 0.06 if plane == "brain" else 0.03
    ring = _ring(e, shape, -wall * e.b * 2, 0.0)
    img[ring] = rng.uniform(190, 240) * (0.8 + 0.2 * rng.random(ring.sum()))
    if plane == "brain":
        mid = Ellipse(e.cx, e.cy, e.a * 0.8, 1.5, e.theta).inside(shape)
        img[mid] = 170
        for side in (-1, 1):
            off = side * e.b * 0.35
            v = Ellipse(e.cx - off * math.sin(e.theta), e.cy + off * math.cos(e.theta),
                        e.a * 0.25, e.b * 0.1, e.theta).inside(shape)
            img[v] *= 0.3
    elif plane == "abdomen":
        sx, sy = e.cx + e.a * 0.3 * math.cos(e.theta), e.cy + e.a * 0.3 * math.sin(e.theta)
        img[Ellipse(sx, sy, e.a * 0.22, e.b * 0.16, e.theta).inside(shape)] *= 0.15
        spine = Ellipse(e.cx - e.a * 0.6 * math.cos(e.theta), e.cy - e.a * 0.6 * math.sin(e.theta),
                        4, 4, 0).inside(shape)
        img[spine] = 230
    elif plane == "thorax":
        heart = Ellipse(e.cx, e.cy, e.a * 0.38, e.b * 0.32, e.theta + 0.4)
        img[heart.inside(shape)] = 140
        img[_ring(heart, shape, -2, 0)] = 210
    # Acoustic shadow below the far wall, as the skull and ribs cast in real scans.
    ang = _angles(e, shape)
    yy = np.mgrid[0:shape[0], 0:shape[1]][0]
    lo = rng.uniform(-math.pi, math.pi)
    shadow = (np.abs(np.angle(np.exp(1j * (ang - lo)))) < 0.35) & ~inside & (yy > e.cy)
    img[shadow] *= 0.45


def _outline(e: Ellipse, shape, thickness: int, gaps: bool, rng: np.random.Generator) -> np.ndarray:
    ring = _ring(e, shape, -thickness / 2, thickness / 2)
    if gaps:
        ang = _angles(e, shape)
        for _ in range(rng.integers(1, 4)):
            start, width = rng.uniform(-math.pi, math.pi), rng.uniform(0.08, 0.3)
            ring &= np.abs(np.angle(np.exp(1j * (ang - start)))) > width / 2
    return ring.astype(np.uint8) * 255


def make_phantom(index: int, cfg: PhantomConfig) -> PhantomSample:
    rng = np.random.default_rng([cfg.seed, index])
    h, w = cfg.height, cfg.width
    plane = cfg.planes[index % len(cfg.planes)]
    border = bool(rng.random() < cfg.border_prob)
    gaps = bool(rng.random() < cfg.gap_prob)
    e = _pick_ellipse(rng, h, w, border, plane)
    img = np.full((h, w), rng.uniform(55, 85))
    img *= np.linspace(1.1, 0.8, h)[:, None]  # depth attenuation
    _draw_structure(img, e, plane, rng)
    img = ndimage.gaussian_filter(img, 0.7) * _speckle(rng, (h, w), 0.8)
    img[~_sector(h, w, rng)] = 0
    image = np.clip(img, 0, 255).astype(np.uint8)
    outline = filled = ellipse = None
    if plane in MASKED_PLANES:
        t = cfg.outline_px
        outline = _outline(e, (h, w), t, gaps, rng)
        filled = e.inside((h, w), grow=t / 2).astype(np.uint8) * 255
        ellipse = e
    patient = f"ph{cfg.seed:03d}p{index // cfg.images_per_patient:05d}"
    return PhantomSample(index, image, outline, filled, plane, patient, ellipse)
