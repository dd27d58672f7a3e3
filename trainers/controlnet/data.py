"""train-controlnet's examples: image+mask pairs, the image as the VAE sees it and the mask as
the ControlNet sees it.

Each sample with a mask is squared (padded or stretched like the LoRA's data) and resized to
``resolution``: the grayscale image bicubic, repeated to RGB and scaled to [-1, 1]; the mask
nearest-neighbour (it stays binary), then ``mask_to_condition`` turns it into the conditioning
image, exactly as the sampler does. With ``augment.enabled`` one random draw of a paired
geometric transform (MONAI: flip, rotation, scale, shift) moves image and mask together; the
draw comes from the global numpy RNG, which the engine seeds per example, so a resumed job
sees the same examples.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import model_validator

from sonosynth.datasets.augment import draw_seed
from sonosynth.datasets.reader import DatasetReader, ReaderConfig
from sonosynth.infra.config import Config
from sonosynth.trainers.controlnet.conditioning import mask_to_condition
from sonosynth.trainers.diffusion.data import PAPER_A_PROMPT, to_square


class GeometricAugmentConfig(Config):
    """Paired geometric augmentation: one draw moves the image and its mask together (the mask
    nearest-neighbour, so it stays binary). Intensity transforms are left out on purpose: the
    ControlNet learns to draw images, so it should see them as they are."""

    enabled: bool = False
    """Augment the training examples (evaluation and preview examples never are); latents are then
    encoded every step instead of once."""
    flip: bool = True
    """Mirror left-right with probability 0.5."""
    rotate_deg: float = 15.0
    """Rotate by up to +- this many degrees."""
    scale: float = 0.1
    """Zoom by a factor in 1 +- this."""
    shift: float = 0.05
    """Shift by up to +- this fraction of the image size, in x and y."""
    prob: float = 0.5
    """Probability of the affine part (rotation, scale, shift) per example."""
    seed: int = 0
    """Seed mixed into every draw."""

    @model_validator(mode="after")
    def _check(self) -> "GeometricAugmentConfig":
        if self.rotate_deg < 0 or not 0 <= self.scale < 1 or not 0 <= self.shift < 0.5:
            raise ValueError("augment needs rotate_deg >= 0, 0 <= scale < 1 and 0 <= shift < 0.5 "
                             "(e.g. rotate_deg 15, scale 0.1, shift 0.05)")
        if not 0 <= self.prob <= 1:
            raise ValueError("augment.prob is a probability: give a value in [0, 1]")
        return self


class ControlNetDataConfig(Config):
    """Which image+mask pairs the ControlNet learns from, at which size, with which prompt."""

    dataset: str
    """Dataset folder or s3:// prefix written by ``sonosynth ingest`` (samples without a mask are left out)."""
    split: str | None = "train"
    """Use only this split (null: every sample)."""
    resolution: int = 512
    """Square training size in pixels (SD 1.5: 512); the sampler draws at this size."""
    resize: Literal["pad", "stretch"] = "pad"
    """'pad' keeps the aspect ratio (black borders); 'stretch' distorts to square like paper A."""
    prompt: str = PAPER_A_PROMPT
    """The prompt of every example (paper A's); the sampler reads it from lineage.json."""
    limit: int | None = None
    """Use at most this many samples (a seeded choice); null: all."""
    seed: int = 0
    """Seed of the ``limit`` choice."""
    augment: GeometricAugmentConfig = GeometricAugmentConfig()
    """Paired geometric augmentation of the training examples."""
    reader: ReaderConfig = ReaderConfig()
    """How damaged shards are treated (on_error: raise or skip; skipped samples are counted in the job's metrics)."""

    @model_validator(mode="after")
    def _check(self) -> "ControlNetDataConfig":
        if self.resolution % 8 or self.resolution < 32:
            raise ValueError(f"data.resolution={self.resolution} must be a multiple of 8 and at least 32 (SD 1.5: 512)")
        if self.limit is not None and self.limit < 1:
            raise ValueError("data.limit must be at least 1, or null for every sample")
        if not self.prompt.strip():
            raise ValueError("data.prompt is empty; give the caption of every example (paper A's is the default)")
        return self


@dataclass
class Pair:
    key: str
    image: np.ndarray
    """float32 RxR grayscale in [0, 1]."""
    mask: np.ndarray
    """bool RxR, True inside the head."""

    def pixels(self) -> torch.Tensor:
        """[3, R, R] in [-1, 1]: what the VAE encodes."""
        return image_pixels(self.image)

    def condition(self) -> torch.Tensor:
        """[3, R, R] in {0, 1}: what the ControlNet is given (``mask_to_condition``, channels first)."""
        return condition_tensor(self.mask)


def image_pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.repeat(image[None], 3, axis=0) * 2.0 - 1.0).float()


def condition_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask_to_condition(mask)).permute(2, 0, 1).contiguous()


def square_pair(image: np.ndarray, mask: np.ndarray, resolution: int, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image and 0/255 mask -> (float32 image in [0, 1], bool mask), both RxR."""
    img = to_square(image.astype(np.float32) / 255.0, resolution, resize, Image.BICUBIC).clip(0, 1)
    msk = to_square((np.asarray(mask) > 127).astype(np.float32), resolution, resize, Image.NEAREST) > 0.5
    return img.astype(np.float32), msk


def load_pairs(cfg: ControlNetDataConfig, storage=None, skipped: dict[str, int] | None = None) -> list[Pair]:
    """The chosen samples with a mask, in key order (every rank reads all of them). ``skipped``,
    when given, gets {reason: count} of what ``cfg.reader.on_error: skip`` left out."""
    reader = DatasetReader(cfg.dataset, split=cfg.split, storage=storage, distributed=False,
                           on_error=cfg.reader.on_error)
    samples = sorted((s for s in reader.samples() if s.mask is not None), key=lambda s: s.key)
    if skipped is not None:
        skipped.update(reader.skipped)
    if not samples:
        raise ValueError(f"{cfg.dataset} (split {cfg.split!r}) has no samples with a mask; train-controlnet needs "
                         "image+mask pairs: ingest a cohort with masks (e.g. hc18), or set data.split=null")
    if cfg.limit is not None and len(samples) > cfg.limit:
        samples = sorted(random.Random(cfg.seed).sample(samples, cfg.limit), key=lambda s: s.key)
    return [Pair(s.key, *square_pair(s.image, s.mask, cfg.resolution, cfg.resize)) for s in samples]


class GeometricAugment:
    """``aug(image, mask, seed)`` -> the RxR pair moved by one draw of the transform (the same for both)."""

    def __init__(self, cfg: GeometricAugmentConfig, resolution: int):
        from monai.transforms import Compose, RandAffined, RandFlipd

        both, shift = ["image", "mask"], cfg.shift * resolution
        ops = [RandFlipd(both, prob=0.5, spatial_axis=1)] if cfg.flip else []
        ops.append(RandAffined(both, prob=cfg.prob, rotate_range=math.radians(cfg.rotate_deg),
                               scale_range=(cfg.scale, cfg.scale), translate_range=(shift, shift),
                               mode=("bilinear", "nearest"), padding_mode="zeros"))
        self.cfg, self.transform = cfg, Compose(ops)

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        self.transform.set_random_state(seed=seed)
        out = self.transform({"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(mask)[None].float()})
        img = torch.as_tensor(out["image"]).numpy()[0].clip(0, 1).astype(np.float32)
        return img, torch.as_tensor(out["mask"]).numpy()[0] > 0.5


class PairDataset(torch.utils.data.Dataset):
    """Map-style view of the pairs for the engine: item ``i`` is pair ``indices[i]`` as {"index",
    "condition" [3, R, R], and "latent_mean" + "latent_std" (cached) or "pixels" [3, R, R]}.

    With ``augment`` each item is a fresh draw (from the global numpy RNG the engine seeds per
    example) and carries pixels, since an augmented image cannot be encoded ahead."""

    def __init__(self, pairs: list[Pair], latents: tuple[torch.Tensor, torch.Tensor] | None = None,
                 indices: range | list[int] | None = None, augment: GeometricAugment | None = None):
        if augment is not None and latents is not None:
            raise ValueError("augmented examples change every step, so their latents cannot be cached")
        self.pairs, self.latents, self.augment = pairs, latents, augment
        self.indices = list(range(len(pairs))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = self.indices[i]
        pair = self.pairs[j]
        item: dict = {"index": j}
        if self.augment is not None:
            epoch = int(np.random.randint(2**31))  # the engine seeds it per example
            image, mask = self.augment(pair.image, pair.mask,
                                       draw_seed("controlnet", self.augment.cfg.seed, epoch, pair.key))
            item["pixels"], item["condition"] = image_pixels(image), condition_tensor(mask)
            return item
        item["condition"] = pair.condition()
        if self.latents is not None:
            item["latent_mean"], item["latent_std"] = self.latents[0][j], self.latents[1][j]
        else:
            item["pixels"] = pair.pixels()
        return item
