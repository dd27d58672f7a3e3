"""Training examples for the diffusion LoRA, in both modes.

``joint`` (paper A): RGB = (image, image, mask), so the LoRA learns to draw a head and its
mask together. ``class`` (FU-LoRA): the grayscale image in all three channels, captioned by
its plane. Images are padded to square (or stretched, as paper A did) and resized; masks
are resized with bilinear weights and thresholded at 0.5 (paper A thresholded at exactly
255, which erodes them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import model_validator
from scipy import ndimage

from sonosynth.datasets.labels import PLANES
from sonosynth.datasets.reader import DatasetReader, ReaderConfig
from sonosynth.infra.config import Config

PAPER_A_PROMPT = "a photo of standard maternal fetal ultrasound planes, fetal head"
FU_LORA_PROMPTS = {
    "abdomen": "a photo of fetal abdomen",
    "brain": "a photo of fetal brain",
    "femur": "a photo of fetal femur",
    "thorax": "a photo of fetal thorax",
    "other": "a photo of fetal ultrasound",
}


class LoraDataConfig(Config):
    """Which samples the LoRA learns from, and how they become diffusion inputs."""

    dataset: str
    """Dataset folder or s3:// prefix written by ``sonosynth ingest``."""
    split: str | None = "train"
    """Use only this split (null: every sample)."""
    mode: Literal["joint", "class"] = "joint"
    """'joint': RGB = image, image, mask (paper A). 'class': one caption per plane (FU-LoRA)."""
    resolution: int = 512
    """Square training size in pixels (SD 1.5: 512)."""
    resize: Literal["pad", "stretch"] = "pad"
    """'pad' keeps the aspect ratio (black borders); 'stretch' distorts to square like paper A."""
    mask_channel: Literal["filled", "outline"] = "filled"
    """Joint mode: the blue channel holds the filled mask or only its outline."""
    outline_px: int = 3
    """Outline thickness at the training resolution when mask_channel is 'outline'."""
    prompt: str = PAPER_A_PROMPT
    """Joint mode: the one prompt of every example (paper A's)."""
    prompt_template: str | None = None
    """Joint mode: per-sample prompt from meta.json fields, e.g. 'fetal {plane}, {cohort}'."""
    class_prompts: dict[str, str] = FU_LORA_PROMPTS
    """Class mode: caption per plane label; samples of other planes are left out."""
    limit: int | None = None
    """Use at most this many samples (seeded choice): the 'few real images' of the papers."""
    per_class: int | None = None
    """Class mode: at most this many samples per plane (FU-LoRA: 20)."""
    seed: int = 0
    """Seed of the limit / per_class choice."""
    reader: ReaderConfig = ReaderConfig()
    """How damaged shards are treated (on_error: raise or skip; skipped samples are counted in the job's metrics)."""

    @model_validator(mode="after")
    def _check(self) -> "LoraDataConfig":
        if self.resolution % 8 or self.resolution < 32:
            raise ValueError("resolution must be a multiple of 8 and at least 32 (SD 1.5: 512)")
        unknown = sorted(set(self.class_prompts) - set(PLANES))
        if unknown:
            raise ValueError(f"class_prompts has unknown planes {unknown}; planes are {list(PLANES)}")
        if self.prompt_template:
            try:
                self.prompt_template.format_map(_Blank())
            except (ValueError, IndexError) as err:
                raise ValueError(f"prompt_template {self.prompt_template!r} is not a format string: {err}") from None
        return self


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


@dataclass
class Example:
    key: str
    pixels: torch.Tensor
    """float32 [3, R, R] in [-1, 1]."""
    prompt: str
    plane: str | None


class ExampleDataset(torch.utils.data.Dataset):
    """Map-style view of the examples for the engine: item ``i`` is example ``indices[i]`` as
    {"index", "prompt_row", and "latent_mean" + "latent_std" (cached) or "pixels"}."""

    def __init__(self, examples: list[Example], prompt_rows: list[int],
                 latents: tuple[torch.Tensor, torch.Tensor] | None = None, indices: list[int] | None = None):
        self.examples, self.prompt_rows, self.latents = examples, prompt_rows, latents
        self.indices = list(range(len(examples))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = self.indices[i]
        item = {"index": j, "prompt_row": self.prompt_rows[j]}
        if self.latents is not None:
            item["latent_mean"], item["latent_std"] = self.latents[0][j], self.latents[1][j]
        else:
            item["pixels"] = self.examples[j].pixels
        return item


def to_square(array: np.ndarray, size: int, how: str, resample) -> np.ndarray:
    h, w = array.shape
    if how == "pad" and h != w:
        side = max(h, w)
        canvas = np.zeros((side, side), np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = array
        array = canvas
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((size, size), resample))


def pack(image: np.ndarray, mask: np.ndarray | None, cfg: LoraDataConfig) -> torch.Tensor:
    """uint8 image (and 0/255 mask) -> float [3, R, R] in [-1, 1] for the chosen mode."""
    img = to_square(image.astype(np.float32) / 255.0, cfg.resolution, cfg.resize, Image.BICUBIC).clip(0, 1)
    if cfg.mode == "class":
        channels = [img, img, img]
    else:
        m = to_square((mask > 127).astype(np.float32), cfg.resolution, cfg.resize, Image.BILINEAR) >= 0.5
        if cfg.mask_channel == "outline":
            m = m & ~ndimage.binary_erosion(m, iterations=cfg.outline_px)
        channels = [img, img, m.astype(np.float32)]
    return torch.from_numpy(np.stack(channels) * 2.0 - 1.0).float()


def load_examples(cfg: LoraDataConfig, storage=None, skipped: dict[str, int] | None = None) -> list[Example]:
    """Read the chosen samples (every rank reads all of them: LoRA sets are small). ``skipped``, when
    given, gets {reason: count} of what ``cfg.reader.on_error: skip`` left out."""
    reader = DatasetReader(cfg.dataset, split=cfg.split, storage=storage, distributed=False,
                           on_error=cfg.reader.on_error)
    samples = sorted(reader.samples(), key=lambda s: s.key)
    if skipped is not None:
        skipped.update(reader.skipped)
    where = f"{cfg.dataset} (split {cfg.split!r})"
    if cfg.mode == "joint":
        samples = [s for s in samples if s.mask is not None]
        if not samples:
            raise ValueError(f"{where} has no samples with a mask; joint mode needs image+mask pairs")
    else:
        samples = [s for s in samples if s.meta.get("plane") in cfg.class_prompts]
        if not samples:
            raise ValueError(f"{where} has no samples of the planes {sorted(cfg.class_prompts)}; "
                             "class mode needs plane labels (ingest fpdb or africa)")
        if cfg.per_class:
            rng = random.Random(cfg.seed)
            by_plane: dict[str, list] = {}
            for s in samples:
                by_plane.setdefault(s.meta["plane"], []).append(s)
            samples = sorted((x for group in by_plane.values()
                              for x in rng.sample(group, min(cfg.per_class, len(group)))), key=lambda s: s.key)
    if cfg.limit is not None and len(samples) > cfg.limit:
        samples = sorted(random.Random(cfg.seed).sample(samples, cfg.limit), key=lambda s: s.key)
    return [Example(s.key, pack(s.image, s.mask, cfg), prompt_for(s.meta, cfg), s.meta.get("plane"))
            for s in samples]


def prompt_for(meta: dict, cfg: LoraDataConfig) -> str:
    if cfg.mode == "class":
        return cfg.class_prompts[meta["plane"]]
    if cfg.prompt_template:
        fields = _Blank({k: ("" if v is None else v) for k, v in meta.items()})
        return " ".join(cfg.prompt_template.format_map(fields).split())
    return cfg.prompt
