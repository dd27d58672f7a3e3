"""Mask geometry: ellipse fit to an outline annotation, robust fill, and fit quality.

Every public fetal-head mask is an ellipse outline (2-3 px thick), sometimes with gaps
after resizing and sometimes cut by the image border. Training needs the filled head.
We fit an ellipse (Halir-Flusser least squares, scikit-image) to the boundary pixels of
the annotation, fill it out to the outer edge of the drawn outline, and keep figures that
say how well the outline matched an ellipse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from pydantic import model_validator
from scipy import ndimage
from skimage.measure import EllipseModel

from sonosynth.infra.config import Config

FillMethod = Literal["ellipse", "holes", "none"]


class MaskRules(Config):
    """What makes a usable filled mask: shared by ingest (annotations) and generate (QC)."""

    threshold: int = 127
    """Mask pixels above this value are foreground."""
    min_pixels: int = 20
    """Fewer foreground pixels than this: the mask is empty (quarantined or rejected)."""
    max_rel_rmse: float = 0.15
    """Ellipse-likeness: RMS distance of the outline to the fitted ellipse / minor semi-axis."""
    min_coverage: float = 0.5
    """Ellipse-likeness: fraction of the fitted ellipse's perimeter the outline must cover."""
    min_axis_ratio: float = 0.2
    """Ellipse-likeness: minor / major axis at least this (a line is not a head)."""

    @model_validator(mode="after")
    def _check_rules(self) -> "MaskRules":
        if not 0 <= self.threshold < 255:
            raise ValueError("threshold must be in 0..254")
        return self

    def fill_kwargs(self) -> dict:
        """The arguments of ``fill_mask`` these rules set."""
        return {name: getattr(self, name) for name in MaskRules.model_fields}


class MaskError(ValueError):
    """A mask that cannot become a training target; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    a: float
    """Semi-axis along the rotated x direction (pixels)."""
    b: float
    """Semi-axis along the rotated y direction (pixels)."""
    theta: float
    """Rotation in radians, counter-clockwise from the image x axis (y pointing down)."""

    def inside(self, shape: tuple[int, int], grow: float = 0.0) -> np.ndarray:
        """Boolean raster of pixel centres inside the ellipse grown by ``grow`` px."""
        h, w = shape
        a, b = self.a + grow, self.b + grow
        r = max(a, b) + 1
        x0, x1 = max(0, int(self.cx - r)), min(w, int(self.cx + r) + 2)
        y0, y1 = max(0, int(self.cy - r)), min(h, int(self.cy + r) + 2)
        out = np.zeros(shape, bool)
        if x0 >= x1 or y0 >= y1 or a <= 0 or b <= 0:
            return out
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        dx, dy = xx - self.cx, yy - self.cy
        c, s = math.cos(self.theta), math.sin(self.theta)
        u, v = dx * c + dy * s, -dx * s + dy * c
        out[y0:y1, x0:x1] = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        return out

    def points(self, n: int = 360) -> np.ndarray:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        c, s = math.cos(self.theta), math.sin(self.theta)
        x = self.cx + self.a * np.cos(t) * c - self.b * np.sin(t) * s
        y = self.cy + self.a * np.cos(t) * s + self.b * np.sin(t) * c
        return np.stack([x, y], 1)

    @property
    def perimeter(self) -> float:
        """Ramanujan's approximation (what HC18 uses for head circumference)."""
        a, b = self.a, self.b
        h = ((a - b) / (a + b)) ** 2
        return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


@dataclass(frozen=True)
class MaskFigures:
    """How the annotation matched an ellipse; stored as ``qc_*`` fields."""

    fit_rmse_px: float
    """Root mean square distance of the annotation's boundary pixels to the fitted ellipse."""
    outline_coverage: float
    """Fraction of the fitted ellipse's in-image perimeter that the annotation covers."""
    area_frac: float
    """Filled area / image area."""
    touches_border: bool
    """The filled region reaches the image border."""
    was_outline: bool
    """The input was an outline (filled by us) rather than an already filled region."""
    ellipse: Ellipse | None

    def as_row(self) -> dict:
        row = {f"qc_{k}": v for k, v in asdict(self).items() if k != "ellipse"}
        e = self.ellipse
        row.update(qc_ellipse_cx=e.cx if e else None, qc_ellipse_cy=e.cy if e else None,
                   qc_ellipse_a=e.a if e else None, qc_ellipse_b=e.b if e else None,
                   qc_ellipse_theta=e.theta if e else None)
        return row


def binarize(mask: np.ndarray, threshold: int = 127) -> np.ndarray:
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > threshold


def _drop_specks(binary: np.ndarray, keep_frac: float = 0.05) -> np.ndarray:
    """Keep connected components holding at least ``keep_frac`` of the foreground.

    A gapped outline breaks into several arcs, all kept; isolated specks are dropped.
    """
    labels, n = ndimage.label(binary, structure=np.ones((3, 3)))
    if n <= 1:
        return binary
    sizes = ndimage.sum_labels(binary, labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= keep_frac * sizes.sum()) + 1
    return np.isin(labels, keep)


def boundary_xy(binary: np.ndarray) -> np.ndarray:
    """(N, 2) x, y of foreground pixels with a background 4-neighbour (image edge excluded)."""
    inner = ndimage.binary_erosion(binary, border_value=1)
    ys, xs = np.nonzero(binary & ~inner)
    return np.stack([xs, ys], 1).astype(np.float64)


def fit_ellipse(xy: np.ndarray) -> Ellipse | None:
    if len(xy) < 5:
        return None
    try:
        model = EllipseModel.from_estimate(xy)
    except (ValueError, TypeError, np.linalg.LinAlgError):  # degenerate input, e.g. a line
        return None
    if not model:
        return None
    (cx, cy), (a, b), theta = model.center, model.axis_lengths, model.theta
    if not all(map(math.isfinite, (cx, cy, a, b, theta))) or min(a, b) <= 0.5:
        return None
    return Ellipse(float(cx), float(cy), float(a), float(b), float(theta))


def _residual_rmse(e: Ellipse, xy: np.ndarray) -> float:
    """Approximate geometric distance via the normalised radial error."""
    c, s = math.cos(e.theta), math.sin(e.theta)
    dx, dy = xy[:, 0] - e.cx, xy[:, 1] - e.cy
    u, v = dx * c + dy * s, -dx * s + dy * c
    rho = np.sqrt((u / e.a) ** 2 + (v / e.b) ** 2)
    radius = np.hypot(u, v)
    dist = np.where(rho > 0, radius * np.abs(1 - 1 / np.maximum(rho, 1e-9)), min(e.a, e.b))
    return float(np.sqrt(np.mean(dist**2)))


def _coverage(e: Ellipse, binary: np.ndarray, tol_px: float = 3.0) -> tuple[float, float]:
    """(covered fraction of the in-image perimeter, in-image perimeter length in px)."""
    h, w = binary.shape
    pts = e.points(720)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= h - 1)
    if not inside.any():
        return 0.0, 0.0
    dist = ndimage.distance_transform_edt(~binary)
    px = np.clip(np.rint(pts[inside]).astype(int), 0, [w - 1, h - 1])
    covered = dist[px[:, 1], px[:, 0]] <= tol_px
    in_len = e.perimeter * inside.mean()
    return float(covered.mean()), float(in_len)


def fill_mask(mask: np.ndarray, fill: FillMethod = "ellipse", threshold: int = 127,
              min_pixels: int = 20, max_rel_rmse: float = 0.15, min_coverage: float = 0.5,
              min_axis_ratio: float = 0.2, keep_drawn: bool = True) -> tuple[np.ndarray, MaskFigures]:
    """Filled 0/255 uint8 head mask from an outline (or filled) annotation.

    Raises MaskError("empty_mask") when nothing is drawn and MaskError("mask_not_ellipse")
    when fill="ellipse" and the drawing is not ellipse-like: no fit, boundary pixels
    further than ``max_rel_rmse`` x the minor semi-axis from it (RMS), less than
    ``min_coverage`` of its in-image perimeter drawn, or minor/major below ``min_axis_ratio``.
    ``keep_drawn=False`` returns the fitted ellipse alone (synthetic masks: stray blobs of the
    drawn mask outside the ellipse are dropped); True also keeps what was drawn (annotations).
    """
    binary = binarize(mask, threshold)
    if binary.sum() < min_pixels:
        raise MaskError("empty_mask", f"mask has {int(binary.sum())} foreground pixels "
                        f"(> {threshold}); at least {min_pixels} are needed")
    binary = _drop_specks(binary)
    ellipse = None
    rmse, coverage = float("nan"), float("nan")
    if fill == "ellipse":
        xy = boundary_xy(binary)
        ellipse = fit_ellipse(xy)
        if ellipse is None:
            raise MaskError("mask_not_ellipse", "no ellipse fits the mask's outline pixels")
        rmse = _residual_rmse(ellipse, xy)
        coverage, in_len = _coverage(ellipse, binary)
        minor, major = sorted((ellipse.a, ellipse.b))
        if minor / major < min_axis_ratio or rmse > max_rel_rmse * minor or coverage < min_coverage:
            raise MaskError("mask_not_ellipse", (
                f"mask is not ellipse-like: fit RMS error {rmse:.1f}px (limit "
                f"{max_rel_rmse * minor:.1f}), outline covers {coverage:.0%} of the ellipse "
                f"(need {min_coverage:.0%}), axis ratio {minor / major:.2f} (need {min_axis_ratio})"))
        fitted = ellipse.inside(binary.shape)
        was_outline = bool(binary.sum() < 0.5 * max(fitted.sum(), 1))
        grow = 0.0
        if was_outline and in_len > 0 and coverage > 0:
            # Fill to the outer edge of the drawn line: half its measured thickness.
            grow = 0.5 * binary.sum() / (coverage * in_len)
            fitted = ellipse.inside(binary.shape, grow=grow)
        filled = ndimage.binary_fill_holes(fitted | binary) if keep_drawn else fitted
        if not fitted.any():
            raise MaskError("mask_not_ellipse", "the fitted ellipse lies outside the image")
    else:
        holes_filled = ndimage.binary_fill_holes(binary)
        was_outline = bool(binary.sum() < 0.5 * holes_filled.sum()) if holes_filled.any() else True
        filled = holes_filled if fill == "holes" else binary
    border = filled[0].any() or filled[-1].any() or filled[:, 0].any() or filled[:, -1].any()
    figures = MaskFigures(
        fit_rmse_px=rmse, outline_coverage=coverage, area_frac=float(filled.mean()),
        touches_border=bool(border), was_outline=was_outline, ellipse=ellipse,
    )
    return (filled.astype(np.uint8) * 255), figures


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
