"""The head-shape model: where fetal heads sit in an image, how big they are and how they turn.

Fitted on the filled masks of a real dataset. Each mask's head ellipse (``fit_head``: the
largest region, holes filled, a least-squares ellipse through its boundary, edges at the
region's edge) is expressed in the unit square of the frame the generator draws in (``pad``:
the mask centred in a square with black borders, or ``stretch``; an exact affine map, the
axes and angle of a stretched ellipse come from the SVD of the map): centre (cx, cy) as
fractions of width and height, semi-axes a >= b as fractions of the side, and the angle t of
the major axis (radians, counter-clockwise from the x axis with y pointing down, mod pi).

The distribution is a multivariate normal on z = (cx, cy, log a, log b, cos 2t, sin 2t). The
angle is axial (t and t + pi are the same ellipse), so it enters through the doubled angle; a
draw's angle is half the angle of its (cos 2t, sin 2t) pair. That is the projected normal
law: circular, without a seam at 0/pi, as concentrated or as uniform as the data, and
correlated with position and size through the one covariance. Log axes keep sizes positive
with a multiplicative spread. The covariance is a Ledoit-Wolf shrunk correlation matrix
(scikit-learn) rescaled by the standard deviations, so a few dozen masks give a positive
definite estimate; its Cholesky factor L is stored and a draw is ``mean + L @ eps`` with
``eps`` from the caller's seeded generator (no eigendecomposition whose signs could differ
between machines).

Draws stay on the fitted support: log axes are clipped to their fitted range; the head is
kept wholly inside the image (its bounding box moved inside by ``border_margin``, shrunk when
larger than the image), or, when partial heads are allowed (``partial_heads: auto`` allows
them when some fitted masks reach the border, as paper A's data does), its centre is kept in
the fitted centres' range. ``render`` draws a filled 0/255 mask of any size.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
from pydantic import field_validator

from sonosynth.datasets.geometry import Ellipse
from sonosynth.infra.config import Config

FORMAT = "sonosynth-shape-model/1"
PARAMETRISATION = ("multivariate normal on (cx, cy, log a, log b, cos 2t, sin 2t); t = atan2(sin 2t, cos 2t) / 2 "
                   "(projected normal); Ledoit-Wolf shrunk correlation; draws = mean + L @ eps")
VARIABLES = ("cx", "cy", "log_a", "log_b", "cos_2t", "sin_2t")
Frame = Literal["pad", "stretch"]


class ShapeModelConfig(Config):
    """How the head-shape model is fitted and where its draws may put a head."""

    partial_heads: Literal["auto", "allow", "forbid"] = "auto"
    """Heads cut by the image border: 'auto' allows them when some fitted masks reach the border
    (paper A's data has such heads), 'allow', or 'forbid' (every head wholly inside)."""
    border_margin: float = 0.02
    """A head kept wholly inside stays this fraction of the side away from the border."""
    min_masks: int = 5
    """Fewest masks with a fittable head needed to fit the model."""

    @field_validator("border_margin")
    @classmethod
    def _margin(cls, v: float) -> float:
        if not 0 <= v < 0.25:
            raise ValueError("border_margin must be in [0, 0.25), e.g. 0.02 (a fraction of the side)")
        return v

    @field_validator("min_masks")
    @classmethod
    def _min_masks(cls, v: int) -> int:
        if v < 2:
            raise ValueError("min_masks must be at least 2 (a covariance needs two masks), e.g. 5")
        return v


@dataclass(frozen=True)
class HeadShape:
    """One head ellipse in the unit square of the frame."""

    cx: float
    """Centre, fraction of the width."""
    cy: float
    """Centre, fraction of the height."""
    a: float
    """Major semi-axis, fraction of the side."""
    b: float
    """Minor semi-axis, fraction of the side."""
    theta: float
    """Angle of the major axis in [0, pi), counter-clockwise from x with y down."""

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def ellipse(self, height: int, width: int) -> Ellipse:
        """The ellipse in pixel coordinates of a ``height`` x ``width`` image (square images: exact)."""
        side = math.sqrt(height * width)
        return Ellipse(self.cx * width - 0.5, self.cy * height - 0.5, self.a * side, self.b * side, self.theta)


def canonical(cx: float, cy: float, a: float, b: float, theta: float) -> HeadShape:
    """a >= b and theta in [0, pi): the one name of an ellipse that has four."""
    if b > a:
        a, b, theta = b, a, theta + math.pi / 2
    return HeadShape(float(cx), float(cy), float(a), float(b), float(theta % math.pi))


def normalize(e: Ellipse, height: int, width: int, frame: Frame) -> HeadShape:
    """A pixel ellipse of a ``height`` x ``width`` mask in the unit square of ``frame``."""
    if frame == "pad":
        side = max(height, width)
        scale = np.array([1.0 / side, 1.0 / side])
        shift = np.array([(side - width) // 2, (side - height) // 2], np.float64)
    else:
        scale, shift = np.array([1.0 / width, 1.0 / height]), np.zeros(2)
    centre = (np.array([e.cx, e.cy]) + 0.5 + shift) * scale  # pixel x covers [x, x + 1)
    c, s = math.cos(e.theta), math.sin(e.theta)
    axes = np.diag(scale) @ np.array([[c, -s], [s, c]]) @ np.diag([e.a, e.b])
    u, sv, _ = np.linalg.svd(axes)
    return canonical(centre[0], centre[1], sv[0], sv[1], math.atan2(u[1, 0], u[0, 0]))


def render(shape: HeadShape, height: int, width: int) -> np.ndarray:
    """The filled ellipse as a uint8 0/255 ``height`` x ``width`` mask (pixel centres inside it)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    du, dv = (xs + 0.5) / width - shape.cx, (ys + 0.5) / height - shape.cy
    c, s = math.cos(shape.theta), math.sin(shape.theta)
    p, q = (du * c + dv * s) / shape.a, (-du * s + dv * c) / shape.b
    return ((p * p + q * q) <= 1.0).astype(np.uint8) * 255


def touches_border(mask: np.ndarray) -> bool:
    m = np.asarray(mask) > 0
    return bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def half_extent(a: float, b: float, theta: float) -> tuple[float, float]:
    """Half width and half height of an ellipse's bounding box."""
    c, s = math.cos(theta), math.sin(theta)
    return math.hypot(a * c, b * s), math.hypot(a * s, b * c)


@dataclass
class ShapeModel:
    """The fitted law of head ellipses; ``sample``, ``render``, ``save``/``load`` (JSON)."""

    mean: list[float]
    cholesky: list[list[float]]
    bounds: dict[str, list[float]]
    """[min, max] of cx, cy, log_a, log_b over the fitted masks."""
    frame: Frame
    partial_heads: bool
    """Whether draws may put the head across the border."""
    border_margin: float
    n_masks: int
    """Masks fitted (those with a head ellipse)."""
    skipped: int = 0
    """Masks without a fittable head (empty or degenerate)."""
    border_fraction: float = 0.0
    """Fraction of the fitted masks that reach the image border."""
    image_sizes: dict[str, int] = field(default_factory=dict)
    """'WxH' -> masks of that size."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the masks came from (dataset, split, manifest sha256)."""

    # -- fitting ---------------------------------------------------------------------------------

    @classmethod
    def fit(cls, masks: Iterable[np.ndarray], cfg: ShapeModelConfig = ShapeModelConfig(), frame: Frame = "pad",
            source: dict[str, Any] | None = None) -> "ShapeModel":
        """Fit on filled masks (HxW, foreground > 127 or bool) in the square of ``frame`` ('pad':
        centred, aspect kept; 'stretch'); a ValueError when too few masks have a head."""
        from sklearn.covariance import LedoitWolf

        from sonosynth.trainers.evaluation.segmentation import fit_head

        rows, skipped, border, sizes = [], 0, 0, {}
        for mask in masks:
            binary = np.asarray(mask) > 127 if np.asarray(mask).dtype != bool else np.asarray(mask)
            e = fit_head(binary) if binary.any() else None
            if e is None:
                skipped += 1
                continue
            h, w = binary.shape
            sizes[f"{w}x{h}"] = sizes.get(f"{w}x{h}", 0) + 1
            border += touches_border(binary)
            s = normalize(e, h, w, frame)
            rows.append([s.cx, s.cy, math.log(s.a), math.log(s.b), math.cos(2 * s.theta), math.sin(2 * s.theta)])
        if len(rows) < cfg.min_masks:
            raise ValueError(f"only {len(rows)} masks have a fittable head ellipse ({skipped} do not); the shape "
                             f"model needs at least min_masks={cfg.min_masks}: point it at a dataset with more "
                             f"filled head masks")
        z = np.asarray(rows, np.float64)
        mean, std = z.mean(0), np.maximum(z.std(0), 1e-6)
        corr = LedoitWolf().fit((z - mean) / std).covariance_
        cov = corr * np.outer(std, std)
        chol = np.linalg.cholesky(cov + 1e-12 * np.eye(len(VARIABLES)))
        fraction = border / len(rows)
        partial = cfg.partial_heads == "allow" or (cfg.partial_heads == "auto" and border > 0)
        bounds = {name: [float(z[:, i].min()), float(z[:, i].max())] for i, name in enumerate(VARIABLES[:4])}
        return cls(mean=mean.tolist(), cholesky=chol.tolist(), bounds=bounds, frame=frame,
                   partial_heads=partial, border_margin=cfg.border_margin, n_masks=len(rows), skipped=skipped,
                   border_fraction=fraction, image_sizes=sizes, source=dict(source or {}))

    # -- drawing ---------------------------------------------------------------------------------

    def sample(self, rng: np.random.Generator, n: int = 1) -> list[HeadShape]:
        """``n`` head shapes; the same generator state always gives the same shapes."""
        eps = rng.standard_normal((n, len(VARIABLES)))
        chol = np.asarray(self.cholesky)
        z = np.asarray(self.mean) + (eps[:, None, :] * chol[None]).sum(-1)  # mean + L @ eps, row by row
        return [self._place(row) for row in z]

    @staticmethod
    def render(shape: HeadShape, height: int, width: int) -> np.ndarray:
        """``render`` (module level): the filled ellipse as a uint8 0/255 mask."""
        return render(shape, height, width)

    def _place(self, z: np.ndarray) -> HeadShape:
        a = math.exp(float(np.clip(z[2], *self.bounds["log_a"])))
        b = math.exp(float(np.clip(z[3], *self.bounds["log_b"])))
        s = canonical(z[0], z[1], a, b, 0.5 * math.atan2(z[5], z[4]))
        if self.partial_heads:
            cx = float(np.clip(s.cx, *np.clip(self.bounds["cx"], 0, 1)))
            cy = float(np.clip(s.cy, *np.clip(self.bounds["cy"], 0, 1)))
            return HeadShape(cx, cy, s.a, s.b, s.theta)
        room = 0.5 - self.border_margin
        hx, hy = half_extent(s.a, s.b, s.theta)
        shrink = min(1.0, room / hx, room / hy)
        a, b, hx, hy = s.a * shrink, s.b * shrink, hx * shrink, hy * shrink
        m = self.border_margin
        return HeadShape(float(np.clip(s.cx, m + hx, 1 - m - hx)), float(np.clip(s.cy, m + hy, 1 - m - hy)),
                         a, b, s.theta)

    # -- storage ---------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """What decides the draws (its sha256 is the model's identity; provenance is left out)."""
        return {"format": FORMAT, "mean": self.mean, "cholesky": self.cholesky, "bounds": self.bounds,
                "frame": self.frame, "partial_heads": self.partial_heads, "border_margin": self.border_margin}

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {**self.params(), "parametrisation": PARAMETRISATION, "variables": list(VARIABLES),
                "n_masks": self.n_masks, "skipped": self.skipped, "border_fraction": self.border_fraction,
                "image_sizes": self.image_sizes, "source": self.source, "sha256": self.sha256()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "shape model") -> "ShapeModel":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where} is not a sonosynth shape model (format {got!r}, expected {FORMAT}); "
                             f"point masks.shape_model at a shape_model.json written by `sonosynth generate`")
        names = ("mean", "cholesky", "bounds", "frame", "partial_heads", "border_margin", "n_masks", "skipped",
                 "border_fraction", "image_sizes", "source")
        return cls(**{k: data[k] for k in names if k in data})

    @classmethod
    def from_json(cls, text: str, where: str = "shape model") -> "ShapeModel":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{where} is not JSON ({err}); point masks.shape_model at a shape_model.json") from None
        return cls.from_dict(data, where)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "ShapeModel":
        return cls.from_json(Path(path).read_text(), str(path))


# -- masks of a dataset, squared and augmented -----------------------------------------------------

class MaskAugmentConfig(Config):
    """Geometric augmentation of real conditioning masks (only the mask is conditioned on)."""

    hflip_prob: float = 0.5
    """Probability of a horizontal flip."""
    vflip_prob: float = 0.5
    """Probability of a vertical flip."""
    rotate_deg: float = 15.0
    """Rotation drawn in +-rotate_deg degrees (paper A's weak augmentation: 15)."""
    scale: float = 0.1
    """Each axis scaled by a factor drawn in 1 +- scale (independently: the aspect changes too)."""
    shift: float = 0.05
    """Shift drawn in +-shift of the side, per axis."""

    @field_validator("hflip_prob", "vflip_prob")
    @classmethod
    def _prob(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError("a flip probability must be in [0, 1], e.g. 0.5")
        return v

    @field_validator("rotate_deg", "scale", "shift")
    @classmethod
    def _range(cls, v: float) -> float:
        if v < 0:
            raise ValueError("rotate_deg, scale and shift are ranges: 0 (off) or more")
        return v


def square_mask(mask: np.ndarray, size: int, frame: Frame) -> np.ndarray:
    """A mask in the ``size`` x ``size`` square of ``frame``, as the diffusion trainers square theirs
    (``trainers.diffusion.data.to_square``: bilinear, then >= 0.5), uint8 0/255."""
    from PIL import Image

    from sonosynth.trainers.diffusion.data import to_square

    binary = (np.asarray(mask) > 127).astype(np.float32)
    return (to_square(binary, size, frame, Image.BILINEAR) >= 0.5).astype(np.uint8) * 255


def augment_mask(mask: np.ndarray, cfg: MaskAugmentConfig, seed: int) -> np.ndarray:
    """One seeded draw of flips, rotation, scale and shift about the image centre, uint8 0/255: the
    mask resampled bilinearly (``scipy.ndimage.affine_transform``) and thresholded at 0.5. The same
    mask and seed always give the same result; with every range 0 it is the mask itself."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = mask.shape
    flip = np.where(rng.random(2) < [cfg.vflip_prob, cfg.hflip_prob], -1.0, 1.0)  # (y, x)
    angle = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale, 2)
    shift = rng.uniform(-cfg.shift, cfg.shift, 2) * (h, w)
    c, s = math.cos(angle), math.sin(angle)
    forward = np.array([[c, s], [-s, c]]) @ np.diag(scale) @ np.diag(flip)  # on (y, x) about the centre
    inverse = np.linalg.inv(forward)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    moved = ndimage.affine_transform((np.asarray(mask) > 127).astype(np.float64), inverse,
                                     offset=centre - inverse @ (centre + shift), order=1, mode="constant", cval=0.0)
    return (moved > 0.5).astype(np.uint8) * 255


def dataset_masks(uri: str, split: str | None, storage=None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The mask PNGs of a dataset's samples ({key: bytes}, sorted by key) and where they came from
    ({dataset, split, manifest_sha256, masks_sha256}); a ValueError naming the fix when there are none."""
    from sonosynth.datasets.manifest import MANIFEST
    from sonosynth.datasets.reader import DatasetReader
    from sonosynth.infra.storage import open_storage

    reader = DatasetReader(uri, split=split, storage=storage, distributed=False)
    files = {r["__key__"]: r["mask.png"] for r in reader.records() if r.get("mask.png")}
    if not files:
        raise ValueError(f"{uri} (split {split!r}) has no samples with a mask; masks.dataset must be an ingested "
                         f"image+mask dataset (e.g. `sonosynth ingest ingest_hc18`), or set masks.split")
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(key.encode() + b"\0" + hashlib.sha256(files[key]).digest())
    manifest = open_storage(uri, storage).get_bytes(MANIFEST)
    return dict(sorted(files.items())), {"dataset": uri, "split": split,
                                         "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                                         "masks_sha256": digest.hexdigest(), "masks": len(files)}
