"""peft LoRA on the UNet attention (and optionally the text encoder), saved in diffusers format.

The saved folder holds ``pytorch_lora_weights.safetensors`` with the LoRA config (rank,
alpha, targets) in its metadata, so ``pipe.load_lora_weights(folder)`` restores the exact
scaling even when alpha differs from rank. A LoRA is only ever read as safetensors:
``check_lora_weights`` refuses anything else (a pickle, random bytes, a truncated file) before
it is loaded, and nothing here calls ``torch.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator

from sonosynth.infra.config import Config
from sonosynth.infra.stage import StageFailed

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_FOLDER = (f"a LoRA folder must hold {WEIGHTS_NAME} (safetensors, as `sonosynth train-lora` writes it; pickled "
               ".bin/.pt weights are never loaded) and its lineage.json")


class LoraFileError(StageFailed):
    """A LoRA folder whose weights are not a readable safetensors file; names the file (exit 1)."""


def check_lora_weights(folder: str | Path) -> Path:
    """The LoRA weights file of ``folder``, checked to be a whole safetensors file holding tensors
    (its header and sizes are read; nothing is unpickled); else a LoraFileError naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise LoraFileError(f"{Path(folder)} holds no {WEIGHTS_NAME}: {LORA_FOLDER}; point the LoRA at the model/ "
                            "folder of a train-lora run")
    try:
        with safe_open(str(path), framework="pt") as weights:
            if not list(weights.keys()):
                raise ValueError("it holds no tensors")
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFileError(f"{path} is not a readable safetensors file ({err}): {LORA_FOLDER}; re-run "
                            "`sonosynth train-lora`, or point the LoRA at the model/ folder of a run") from None
    return path


class LoraConfig(Config):
    """Low-rank adapters: where they go, their size and their initialisation."""

    rank: int = 128
    """LoRA rank r (paper A: 128; FU-LoRA: 8, 32 or 128)."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. Null means alpha = rank (both papers)."""
    init: Literal["gaussian", "kaiming", "pissa", "olora"] = "gaussian"
    """Initialisation of the A matrices (B starts at zero, so training starts at the base model)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    unet_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    """UNet attention projections that get an adapter."""
    text_encoder: bool = False
    """Also train a LoRA on the text encoder (FU-LoRA); text embeddings cannot then be cached."""
    text_encoder_targets: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    """Text-encoder projections that get an adapter when ``text_encoder`` is true."""

    @model_validator(mode="after")
    def _check(self) -> "LoraConfig":
        if self.rank < 1:
            raise ValueError("rank must be at least 1 (papers: 8, 32, 128)")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if not self.unet_targets:
            raise ValueError("unet_targets is empty; the papers use [to_q, to_k, to_v, to_out.0]")
        return self

    def peft_config(self, targets: list[str]):
        from peft import LoraConfig as PeftLoraConfig

        init = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa", "olora": "olora"}[self.init]
        return PeftLoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, lora_dropout=self.dropout,
                              init_lora_weights=init, target_modules=targets)


def add_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module, cfg: LoraConfig) -> None:
    """Attach adapters in place; only adapter weights require grad afterwards."""
    unet.add_adapter(cfg.peft_config(cfg.unet_targets))
    if cfg.text_encoder:
        text_encoder.add_adapter(cfg.peft_config(cfg.text_encoder_targets))


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def save_lora(folder: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
              cfg: LoraConfig) -> Path:
    """Write the adapters in the diffusers layout; returns the weights file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def metadata(targets: list[str]) -> dict:
        return {"r": cfg.rank, "lora_alpha": cfg.alpha or cfg.rank, "target_modules": list(targets),
                "lora_dropout": cfg.dropout}

    te_layers = None
    if cfg.text_encoder and text_encoder is not None:
        te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=te_layers,
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata(cfg.unet_targets),
        text_encoder_lora_adapter_metadata=metadata(cfg.text_encoder_targets) if te_layers else None,
    )
    return Path(folder) / WEIGHTS_NAME


def write_random_lora(folder: str | Path, model, *, rank: int = 8, resolution: int = 64, std: float = 0.2,
                      seed: int = 0, prompt: str = "a photo of fetal head") -> Path:
    """A joint-mode LoRA with random adapters, in the exact layout ``train-lora`` writes
    (weights + lineage.json): for benchmarks and tests that need a LoRA but not a trained one."""
    import hashlib
    import json

    from sonosynth.trainers.diffusion.models import build_components

    parts = build_components(model)
    cfg = LoraConfig(rank=rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(parts.unet, parts.text_encoder, cfg)
        with torch.no_grad():
            for p in lora_parameters(parts.unet):
                p.add_(torch.randn_like(p) * std)
    weights = save_lora(folder, parts.unet, None, cfg)
    (Path(folder) / "lineage.json").write_text(json.dumps({
        "mode": "joint", "prompts": [prompt], "resolution": resolution, "clip_skip": model.clip_skip,
        "base_model": model.identity(), "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}))
    return Path(folder)
