"""Synthetic samples: image and mask out of a joint-mode RGB sample, and the quality filter.

A joint model draws RGB = (image, image, mask). The image is the red channel (or the mean of
red and green); the mask is the blue channel thresholded (paper A: > 180). The largest
component is kept (with arcs of a gapped outline), an ellipse is fitted and filled, and the
sample is rejected when the mask is empty, tiny, huge, cut by the image border or not
ellipse-like. The reason and the QC figures go into ``meta.json`` and the manifest. In mask
mode the sample keeps its conditioning mask untouched and, when a segmenter is given, is checked
by the Dice of the segmenter's mask against it (``extract_mask_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import model_validator

from sonosynth.datasets.geometry import Ellipse, MaskError, MaskRules, fill_mask

EMPTY, TINY, HUGE, OFF_IMAGE, NOT_ELLIPSE = "empty_mask", "mask_tiny", "mask_huge", "mask_off_image", "mask_not_ellipse"
LOW_FIDELITY = "low_label_fidelity"
"""Mask mode: the segmenter's mask for the image is too far from the conditioning mask."""
FIDELITY_QC = ("segmenter", "min_label_fidelity")
"""The mask-mode quality filter's own fields."""
MASK_MODE_QC = ("min_pixels", "enforce", *FIDELITY_QC)
"""QC fields that apply in mask mode (the others are joint mode's mask extraction)."""


class QCConfig(MaskRules):
    """Mask extraction and the quality filter of synthetic samples (joint mode), or label fidelity
    of the images drawn for given masks (mask mode)."""

    threshold: int = 180
    """Blue values above this are mask (paper A: 180)."""
    min_axis_ratio: float = 0.3
    """Ellipse-likeness: minor / major axis at least this (fetal heads are 0.6-0.9)."""
    image_channel: Literal["red", "red_green"] = "red"
    """Image from the red channel (paper A) or the mean of red and green."""
    min_area_frac: float = 0.02
    """Filled mask below this fraction of the image: rejected as tiny."""
    max_area_frac: float = 0.8
    """Filled mask above this fraction of the image: rejected as huge."""
    allow_border: bool = False
    """Accept masks that reach the image border (a head cut off by the sector edge)."""
    enforce: bool = True
    """Reject failing samples. False keeps them (reason recorded in meta.json): for benchmarks."""
    segmenter: str | None = None
    """Mask mode: a SAM fine-tuned by train-sam (model folder, s3:// prefix or MLflow URI, e.g.
    models:/sonosynth-sam@champion), prompted with the tight box of each conditioning mask; the Dice of
    its mask against the conditioning mask is the sample's label fidelity. Null: no QC in mask mode."""
    min_label_fidelity: float = 0.5
    """Mask mode with a segmenter: images whose label fidelity (Dice) is below this are redrawn."""

    @model_validator(mode="after")
    def _check(self) -> "QCConfig":
        if not 0 <= self.min_area_frac < self.max_area_frac <= 1:
            raise ValueError("need 0 <= min_area_frac < max_area_frac <= 1")
        if not 0 <= self.min_label_fidelity <= 1:
            raise ValueError("min_label_fidelity is a Dice: give a value in [0, 1], e.g. 0.5")
        if self.segmenter is not None and not self.segmenter.strip():
            raise ValueError("segmenter is empty; give a train-sam model folder, s3:// prefix or MLflow URI, or null")
        return self


@dataclass
class Extracted:
    image: np.ndarray
    """uint8 HxW grayscale."""
    mask: np.ndarray | None
    """uint8 0/255 filled mask (None in class mode, or when no mask could be made)."""
    reason: str | None = None
    """Why the sample fails QC (None: it passes)."""
    detail: str = ""
    qc: dict[str, Any] = field(default_factory=dict)
    """qc_* figures for meta.json and the manifest."""


def gray_from_rgb(rgb: np.ndarray, channel: str) -> np.ndarray:
    if channel == "red":
        return rgb[..., 0].copy()
    return ((rgb[..., 0].astype(np.uint16) + rgb[..., 1]) // 2).astype(np.uint8)


def extract_joint(rgb: np.ndarray, cfg: QCConfig) -> Extracted:
    """Image, filled mask and verdict of one joint-mode sample (HxWx3 uint8)."""
    image = gray_from_rgb(rgb, cfg.image_channel)
    try:
        mask, figures = fill_mask(rgb[..., 2], fill="ellipse", keep_drawn=False, **cfg.fill_kwargs())
    except MaskError as err:
        return Extracted(image, None, err.reason, str(err))
    qc = figures.as_row()
    if figures.area_frac < cfg.min_area_frac:
        return Extracted(image, mask, TINY, f"mask covers {figures.area_frac:.1%} of the image "
                         f"(min_area_frac {cfg.min_area_frac:.1%})", qc)
    if figures.area_frac > cfg.max_area_frac:
        return Extracted(image, mask, HUGE, f"mask covers {figures.area_frac:.1%} of the image "
                         f"(max_area_frac {cfg.max_area_frac:.1%})", qc)
    if figures.touches_border and not cfg.allow_border:
        return Extracted(image, mask, OFF_IMAGE, "mask reaches the image border (qc.allow_border=false)", qc)
    return Extracted(image, mask, None, "", qc)


def extract(rgb: np.ndarray, mode: str, cfg: QCConfig) -> Extracted:
    """Joint: image + mask + QC. Class: the mean of the channels, nothing to reject."""
    if mode == "joint":
        return extract_joint(rgb, cfg)
    return Extracted(rgb.mean(axis=2).round().astype(np.uint8), None)


def extract_mask_mode(rgb: np.ndarray, mask: np.ndarray, cfg: QCConfig, fidelity=None,
                      ellipse: Ellipse | None = None) -> Extracted:
    """Mask mode: the image drawn for ``mask`` (the mean of its channels) and ``mask`` itself, untouched.

    The qc_* figures describe the conditioning mask (``ellipse``: its head ellipse in pixels, when
    known). A mask with fewer than ``min_pixels`` foreground pixels is rejected as empty; with
    ``fidelity(image, mask) -> Dice`` (a segmenter) the Dice is ``qc_label_fidelity`` and an image
    below ``min_label_fidelity`` is rejected."""
    image = rgb.mean(axis=2).round().astype(np.uint8)
    pixels = int(np.count_nonzero(mask))
    qc: dict[str, Any] = {
        "qc_area_frac": pixels / mask.size, "qc_touches_border": bool(
            mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()),
        "qc_was_outline": False, "qc_fit_rmse_px": None, "qc_outline_coverage": None,
        **{f"qc_ellipse_{k}": getattr(ellipse, k) if ellipse else None for k in ("cx", "cy", "a", "b", "theta")},
    }
    if pixels < cfg.min_pixels:
        return Extracted(image, mask, EMPTY, f"conditioning mask has {pixels} pixels (min_pixels {cfg.min_pixels})",
                         qc)
    if fidelity is None:
        return Extracted(image, mask, None, "", qc)
    dice = float(fidelity(image, mask))
    qc["qc_label_fidelity"] = dice
    if dice < cfg.min_label_fidelity:
        return Extracted(image, mask, LOW_FIDELITY, f"the segmenter's mask has Dice {dice:.3f} with the conditioning "
                         f"mask (min_label_fidelity {cfg.min_label_fidelity})", qc)
    return Extracted(image, mask, None, "", qc)
