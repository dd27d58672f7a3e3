"""Paired image+mask augmentation, box prompts drawn after it, and SAM preprocessing.

One random draw moves image and mask together (MONAI dictionary transforms on keys
``image`` and ``mask``; the mask is resampled with nearest interpolation and stays 0/1).
Presets follow paper A (PAPERS.md), with its fix: the box prompt is computed from the
**augmented** mask, never before augmentation.

- ``none``: nothing.
- ``weak`` (WA): horizontal and vertical flip, rotation within +-15 deg, brightness (intensity
  shift +-0.2) and contrast (gamma 0.8-1.25), a light blur (gaussian sigma 0.5-1 px at 256 px,
  about a 3 px kernel), gaussian noise (std up to 0.03 of the range).
- ``strong`` (SA): rotation within +-45 deg, intensity shift +-0.2, elastic deformation
  (a smooth field like albumentations' ``ElasticTransform(alpha=120, sigma=12)`` at 256 px:
  displacements of 1-2 px, correlated over ~24 px), coarse dropout (1-8 black holes of
  4-16 px, image only: the target stays the head).

Every transform fires with probability 0.5. Pixel-sized parameters are given at 256 px and
scale with the image's longest side. A draw is a function of (seed, epoch, index) alone.

SAM preprocessing resizes the longest side to the encoder's input size (bilinear with
antialias, torch's ``F.interpolate``: ``segment_anything.utils.transforms.ResizeLongestSide``
imports torchvision, so it is not used; its size rounding is reproduced), replicates the
grayscale image to 3 channels, normalises with SAM's pixel mean and std, and pads
right/bottom to a square, like ``Sam.preprocess``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator

from sonosynth.infra.config import Config
from sonosynth.infra.seeds import derive_seed

Preset = Literal["none", "weak", "strong"]
BASE_SIZE = 256
"""The image size paper A's pixel parameters (box jitter, blur, elastic, dropout) refer to."""
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class AugmentConfig(Config):
    """Paired augmentation and box prompts for SAM training (paper A, with its fixes)."""

    preset: Preset = "none"
    """none, weak (flips, +-15 deg, brightness/contrast, blur, noise) or strong (+-45 deg,
    intensity shift, elastic, coarse dropout)."""
    box_jitter_px: int = 19
    """Each side of the box prompt is pushed out by a random 0..box_jitter_px px (at 256 px;
    scaled to the image's longest side). Paper A: 0-19."""

    @field_validator("box_jitter_px")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("box_jitter_px must be 0 or more (0: the tight box), e.g. 19")
        return v


def _clip01(x):
    """Keep intensities in [0, 1] after the intensity transforms (module level: picklable)."""
    return x.clamp(0.0, 1.0) if isinstance(x, torch.Tensor) else np.clip(x, 0.0, 1.0)


def build_transform(preset: Preset, shape: tuple[int, int]):
    """The MONAI ``Compose`` of ``preset`` for channel-first images of ``shape`` (None for none)."""
    if preset == "none":
        return None
    from monai.transforms import (Compose, Lambdad, Rand2DElasticd, RandAdjustContrastd, RandCoarseDropoutd,
                                  RandFlipd, RandGaussianNoised, RandGaussianSmoothd, RandRotated,
                                  RandShiftIntensityd)

    s = max(shape) / BASE_SIZE
    both, modes = ["image", "mask"], ("bilinear", "nearest")
    if preset == "weak":
        ops = [
            RandFlipd(both, prob=0.5, spatial_axis=1),
            RandFlipd(both, prob=0.5, spatial_axis=0),
            RandRotated(both, range_x=math.radians(15), prob=0.5, mode=modes, padding_mode="zeros"),
            RandShiftIntensityd("image", offsets=0.2, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.5),
            RandGaussianSmoothd("image", sigma_x=(0.5 * s, 1.0 * s), sigma_y=(0.5 * s, 1.0 * s), prob=0.5),
            RandGaussianNoised("image", std=0.03, prob=0.5),
        ]
    elif preset == "strong":
        ops = [
            RandRotated(both, range_x=math.radians(45), prob=0.5, mode=modes, padding_mode="zeros"),
            RandShiftIntensityd("image", offsets=0.2, prob=0.5),
            Rand2DElasticd(both, spacing=(24 * s, 24 * s), magnitude_range=(1.0 * s, 2.0 * s), prob=0.5,
                           mode=modes, padding_mode="zeros"),
            RandCoarseDropoutd("image", holes=1, max_holes=8, spatial_size=max(1, round(4 * s)),
                               max_spatial_size=max(1, round(16 * s)), fill_value=0.0, prob=0.5),
        ]
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}; use none, weak or strong")
    return Compose([*ops, Lambdad("image", _clip01)])


def _plane(array) -> np.ndarray:
    """HxW from HxW or 1xHxW (numpy or torch)."""
    array = np.asarray(array)
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def draw_seed(what: str, seed: int, epoch: int, index: int | str) -> int:
    """The 32-bit seed of one random draw (``what``: augment, box, ...) of sample ``index``."""
    return derive_seed(what, seed, epoch, index) % (2**32)


class PairedAugment:
    """``aug(image, mask, epoch=, index=)`` -> (float32 HxW image in [0, 1], uint8 0/1 HxW mask).

    Takes HxW (or 1xHxW, as ``DatasetReader`` yields) uint8 images, or floats in [0, 1]. The same
    (seed, epoch, index) always gives the same draw, in any process: the transform's random
    state is reset from them on every call. ``index`` may be the sample index or its key.
    """

    def __init__(self, preset: Preset = "none", seed: int = 0):
        if preset not in ("none", "weak", "strong"):
            raise ValueError(f"unknown augmentation preset {preset!r}; use none, weak or strong")
        self.preset, self.seed = preset, seed
        self._by_shape: dict[tuple[int, int], Any] = {}

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, *, epoch: int = 0,
                 index: int | str = 0) -> tuple[np.ndarray, np.ndarray | None]:
        image = _plane(image)
        mask = None if mask is None else _plane(mask)
        img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        msk = None if mask is None else (mask > 0).astype(np.float32)
        shape = img.shape[:2]
        if shape not in self._by_shape:
            self._by_shape[shape] = build_transform(self.preset, shape)
        transform = self._by_shape[shape]
        if transform is None:
            return img, None if msk is None else msk.astype(np.uint8)
        transform.set_random_state(seed=draw_seed("augment", self.seed, epoch, index))
        data = {"image": torch.from_numpy(img)[None],
                "mask": torch.from_numpy(msk if msk is not None else np.zeros(shape, np.float32))[None]}
        out = transform(data)
        img_out = torch.as_tensor(out["image"]).numpy()[0].astype(np.float32)
        mask_out = (torch.as_tensor(out["mask"]).numpy()[0] > 0.5).astype(np.uint8)
        return img_out, None if msk is None else mask_out


def tight_box(mask: np.ndarray) -> np.ndarray | None:
    """[x0, y0, x1, y1] of the foreground's extreme pixel indices (inclusive); None when empty."""
    ys, xs = np.nonzero(np.asarray(mask) > 0)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def box_from_mask(mask: np.ndarray, jitter_px: int = 19, generator: np.random.Generator | None = None,
                  base_size: int = BASE_SIZE) -> np.ndarray | None:
    """Box prompt [x0, y0, x1, y1] (float32, image pixel indices) around the mask's foreground.

    Each side is pushed out independently by a random integer in [0, jitter_px] times
    ``max(H, W) / base_size`` (paper A: 0-19 px at 256 px) and clipped to the image. Call it on
    the augmented mask. An empty mask gives None: the caller skips the sample or prompts with
    the whole image (``full_box``).
    """
    mask = np.asarray(mask)
    box = tight_box(mask)
    if box is None:
        return None
    h, w = mask.shape[:2]
    if jitter_px:
        rng = generator if generator is not None else np.random.default_rng()
        push = rng.integers(0, jitter_px + 1, size=4).astype(np.float32) * (max(h, w) / base_size)
        box = box + push * np.array([-1, -1, 1, 1], np.float32)
    return np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)


def full_box(shape: tuple[int, int]) -> np.ndarray:
    """The whole image as a box prompt (what an empty mask is prompted with)."""
    return np.array([0, 0, shape[1] - 1, shape[0] - 1], np.float32)


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size after resizing the longest side to ``long_side`` (SAM's rounding)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_mask(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A 0/1 mask resized to ``size``: bilinear on the filled region, then >= 0.5 (not == 255)."""
    m = torch.as_tensor(np.asarray(mask) > 0, dtype=torch.float32)[None, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return (m[0, 0] >= 0.5).to(torch.uint8)


def sam_preprocess(image: np.ndarray, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM input [3, S, S] float32 from a grayscale HxW image (uint8 0-255, or float 0-1), and the
    resized size (h, w) inside the square (``postprocess`` needs it)."""
    image = np.asarray(image)
    x = torch.as_tensor(image.astype(np.float32) * (1.0 if image.dtype == np.uint8 else 255.0))
    if x.ndim == 3:
        x = x.mean(-1)
    h, w = preprocess_shape(*x.shape, image_size)
    x = F.interpolate(x[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    x = x.expand(3, -1, -1)
    x = (x - torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    return F.pad(x, (0, image_size - w, 0, image_size - h)), (h, w)


def boxes_to_input(boxes: np.ndarray, original_size: tuple[int, int], image_size: int) -> np.ndarray:
    """Boxes [K, 4] from image pixels to the model's input frame (SAM's ``apply_boxes``)."""
    h, w = preprocess_shape(*original_size, image_size)
    scale = np.array([w / original_size[1], h / original_size[0]] * 2, np.float32)
    return (np.asarray(boxes, np.float32).reshape(-1, 4) * scale).astype(np.float32)


def logit_target(mask: np.ndarray, image_size: int, low_res: int) -> torch.Tensor:
    """The mask in the frame of SAM's low-res logits [1, L, L]: resized like the image, padded."""
    h, w = preprocess_shape(*np.asarray(mask).shape[:2], image_size)
    th, tw = max(1, round(h * low_res / image_size)), max(1, round(w * low_res / image_size))
    m = resize_mask(mask, (th, tw)).float()
    return F.pad(m, (0, low_res - tw, 0, low_res - th))[None]

