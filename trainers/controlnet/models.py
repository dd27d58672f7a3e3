"""The ControlNet, the frozen base it steers, and the module DeepSpeed trains.

The base is the LoRA stage's Stable Diffusion (``DiffusionModelConfig``: SD 1.5 from a local
diffusers folder, or the tiny model), optionally with a trained LoRA fused into it first
(``base_components``): the ControlNet is then made from, and trained against, the UNet the
sampler will use. ``ControlNetModel.from_unet`` copies the UNet's encoder (the ControlNet
paper's initialisation); its zero convolutions start the residuals at zero, so training
starts from the base model's images.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import model_validator

from sonosynth.infra.config import Config
from sonosynth.trainers.diffusion.models import Components, DiffusionModelConfig, build_components, build_pipeline
from sonosynth.trainers.diffusion.train import diffusion_target, noised_latents


class ControlNetConfig(Config):
    """The ControlNet made from the base UNet."""

    conditioning_channels: list[int] = [16, 32, 96, 256]
    """Widths of the small encoder of the mask (the ControlNet paper's [16, 32, 96, 256]); each entry
    after the first halves the size, so 2**(entries - 1) must equal the VAE's downscale (SD: 8)."""
    from_unet_weights: bool = True
    """Start the ControlNet's encoder from the base UNet's weights (the ControlNet paper); false: random."""
    gradient_checkpointing: bool = False
    """Recompute the ControlNet's activations in the backward pass: less GPU memory, about 30% slower."""

    @model_validator(mode="after")
    def _check(self) -> "ControlNetConfig":
        if not self.conditioning_channels or min(self.conditioning_channels) < 1:
            raise ValueError("controlnet.conditioning_channels needs positive widths, e.g. [16, 32, 96, 256]")
        return self

    def downscale(self) -> int:
        return 2 ** (len(self.conditioning_channels) - 1)


def vae_downscale(model: DiffusionModelConfig) -> int:
    """How many times smaller than the image the base model's latents are (SD: 8)."""
    if model.pretrained:
        import json

        vae = json.loads((Path(model.pretrained).expanduser() / "vae" / "config.json").read_text())
        return 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return 2 ** (len(model.tiny.vae_channels) - 1)


def base_components(model: DiffusionModelConfig, lora_dir: Path | None = None, lora_scale: float = 1.0) -> Components:
    """The frozen base model, with the LoRA in ``lora_dir`` (a fetched train-lora folder) fused in
    (UNet and, when it has one, text encoder), exactly as the sampler fuses it."""
    parts = build_components(model)
    if lora_dir is not None:
        from sonosynth.trainers.diffusion.lora import WEIGHTS_NAME

        pipe = build_pipeline(model, parts)
        pipe.load_lora_weights(str(lora_dir), weight_name=WEIGHTS_NAME, use_safetensors=True)
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
        for module in (parts.unet, parts.text_encoder):
            module.requires_grad_(False)
    return parts


def build_controlnet(unet: torch.nn.Module, cfg: ControlNetConfig, seed: int):
    """A ``ControlNetModel`` made from ``unet``; its new layers are drawn from ``seed`` (the same on
    every rank and every run)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_channels),
            load_weights_from_unet=cfg.from_unet_weights)
    controlnet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    return controlnet


def controlnet_pipeline(parts: Components, controlnet, scheduler=None):
    """Plain diffusers ``StableDiffusionControlNetPipeline`` over the base components (no safety checker)."""
    from diffusers import StableDiffusionControlNetPipeline

    return StableDiffusionControlNetPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        controlnet=controlnet, scheduler=scheduler or parts.noise_scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


class ControlNetDiffusionModule(torch.nn.Module):
    """The module DeepSpeed wraps: ``forward(batch, generator)`` is the epsilon (or v) MSE of the frozen
    UNet steered by the ControlNet's residuals; only the ControlNet's parameters require grad."""

    def __init__(self, controlnet, unet, vae, noise_scheduler, vae_scaling: float):
        super().__init__()
        self.controlnet = controlnet
        self.unet = unet
        self.vae = vae  # None when latents are cached
        self.noise_scheduler = noise_scheduler
        self.vae_scaling = vae_scaling

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        dtype = next(self.controlnet.parameters()).dtype
        latents, noise, t, noisy = noised_latents(batch, self.vae, self.noise_scheduler, self.vae_scaling, generator,
                                                  next(self.controlnet.parameters()).device)
        noisy = noisy.to(dtype)
        emb = batch["text_emb"].to(dtype)
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=emb, controlnet_cond=batch["condition"].to(dtype),
                                    return_dict=False)
        pred = self.unet(noisy, t, emb, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        return F.mse_loss(pred.float(), diffusion_target(self.noise_scheduler, latents, noise, t).float())
