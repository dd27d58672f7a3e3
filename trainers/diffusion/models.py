"""Stable Diffusion components: SD 1.5 from a local diffusers folder, or a tiny model from config.

Both paths return the same classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDPMScheduler), so training and sampling code never branches on model size.
The tiny model is built deterministically from its config and seed (the same config always
gives the same weights), and its tokenizer is byte-level and built in memory: no hub, no files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator

from sonosynth.infra.config import Config


class TinyDiffusionConfig(Config):
    """A small random Stable-Diffusion-shaped model for tests, the demo and CPU benchmarks."""

    unet_channels: list[int] = [32, 64]
    """UNet block widths (one down/up block each; the last down block has cross-attention)."""
    vae_channels: list[int] = [16, 16, 32, 32]
    """VAE block widths; the latent is 2**(len-1) times smaller than the image (8 for 4 blocks)."""
    text_hidden: int = 32
    """Width of the CLIP text model (also the UNet cross-attention width)."""
    text_layers: int = 2
    """Transformer layers of the CLIP text model."""
    max_tokens: int = 77
    """Prompt length in tokens (CLIP uses 77)."""
    seed: int = 0
    """Seed of the random weights: the same config and seed always give the same model."""

    @model_validator(mode="after")
    def _check(self) -> "TinyDiffusionConfig":
        if len(self.unet_channels) < 2:
            raise ValueError("unet_channels needs at least 2 blocks, e.g. [32, 64]")
        if any(c % 8 for c in self.unet_channels + self.vae_channels):
            raise ValueError("unet_channels and vae_channels must be multiples of 8 (group norm)")
        return self


class DiffusionModelConfig(Config):
    """Which base model to fine-tune or sample from."""

    pretrained: str | None = None
    """Local diffusers folder of Stable Diffusion 1.5 (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/). Null builds the tiny model below instead."""
    tiny: TinyDiffusionConfig = TinyDiffusionConfig()
    """The tiny model used when ``pretrained`` is null."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts (SD 1.5 and both papers: epsilon)."""
    clip_skip: int = 1
    """Use the text encoder's n-th last hidden state (FU-LoRA: 2; SD default: 1)."""

    @model_validator(mode="after")
    def _check(self) -> "DiffusionModelConfig":
        if self.pretrained is not None:
            root = Path(self.pretrained).expanduser()
            missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer") if not (root / d).is_dir()]
            if missing:
                raise ValueError(
                    f"{root} is not a diffusers Stable Diffusion folder (missing {', '.join(d + '/' for d in missing)}); "
                    "point model.pretrained at a local copy of stable-diffusion-v1-5, or set it to null "
                    "for the tiny model")
        if self.clip_skip < 1:
            raise ValueError("clip_skip counts from 1 (the last hidden state)")
        return self

    def identity(self) -> str:
        """A stable name for lineage: the folder path, or ``tiny-<hash of its config>``."""
        if self.pretrained:
            return str(Path(self.pretrained).expanduser().resolve())
        digest = hashlib.sha256(json.dumps(self.tiny.to_dict(), sort_keys=True).encode()).hexdigest()
        return f"tiny-{digest[:12]}"


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def byte_level_tokenizer(max_tokens: int):
    """A CLIP tokenizer over single bytes (no merges): any prompt encodes, nothing is downloaded."""
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):  # GPT-2's byte-to-unicode map, so every byte has a visible symbol
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    symbols = [table[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)


def build_tiny(cfg: TinyDiffusionConfig, prediction_type: str = "epsilon") -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_tokenizer(cfg.max_tokens)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        n = len(cfg.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4, out_channels=4,
            block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            cross_attention_dim=cfg.text_hidden,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=tuple(cfg.vae_channels),
            down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
            layers_per_block=1, norm_num_groups=8, sample_size=64,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 2,
            num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_tokens,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type,
                              clip_sample=False, steps_offset=1)
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


def build_pretrained(path: str, prediction_type: str = "epsilon") -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path).expanduser()
    return Components(
        unet=UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True),
        vae=AutoencoderKL.from_pretrained(root / "vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        noise_scheduler=DDPMScheduler.from_pretrained(root / "scheduler", local_files_only=True,
                                                      prediction_type=prediction_type),
    )


def build_components(cfg: DiffusionModelConfig) -> Components:
    """All components, frozen (``requires_grad=False``) and in eval mode; LoRA is added later."""
    parts = build_pretrained(cfg.pretrained, cfg.prediction_type) if cfg.pretrained \
        else build_tiny(cfg.tiny, cfg.prediction_type)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return parts


def build_pipeline(cfg: DiffusionModelConfig, parts: Components | None = None, scheduler=None):
    """A ``StableDiffusionPipeline`` over the base model (no safety checker: medical images)."""
    from diffusers import StableDiffusionPipeline

    parts = parts or build_components(cfg)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=scheduler or parts.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
