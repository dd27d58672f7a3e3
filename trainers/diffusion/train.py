"""The ``train-lora`` stage: a Stable Diffusion LoRA in joint (paper A) or class (FU-LoRA) mode.

The VAE and (unless it gets its own LoRA) the text encoder are frozen, so latents and text
embeddings are computed once and cached (latents with the engine's ``encode_once``: each rank
encodes its share, the shares are gathered). Per step only the UNet runs. The cached latent
keeps the VAE's mean and std, and a fresh latent is drawn from them every step, exactly as
encoding every step would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator

from sonosynth.datasets.preview import tile_images
from sonosynth.datasets.records import encode_png
from sonosynth.infra.config import Config
from sonosynth.trainers.config import TrainStageConfig
from sonosynth.trainers.diffusion.data import Example, ExampleDataset, LoraDataConfig, load_examples
from sonosynth.trainers.diffusion.lora import WEIGHTS_NAME, LoraConfig, add_lora, lora_parameters, save_lora
from sonosynth.trainers.diffusion.models import DiffusionModelConfig, build_components, build_pipeline
from sonosynth.trainers.task import TrainTask, WorkerContext, encode_once
from sonosynth.trainers.tasks import register_task


class CacheConfig(Config):
    """What is computed once instead of every step."""

    latents: bool = True
    """Encode every example through the frozen VAE once (false: encode every step)."""
    text: bool | None = None
    """Encode each prompt once; null caches whenever the text encoder is frozen."""


class PreviewConfig(Config):
    """Images sampled from the trained LoRA at the end, logged to MLflow and written to out."""

    num: int = 8
    """How many (0: none)."""
    steps: int = 20
    """Denoising steps (DPM-Solver++)."""
    guidance: float = 7.5
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of the preview noise."""


class LoraTrainConfig(TrainStageConfig):
    """``sonosynth train-lora``: recipe fields below, engine/optim/tracking from the base."""

    task: ClassVar[str] = "lora"
    stage: ClassVar[str] = "train-lora"
    experiment: ClassVar[str] = "sonosynth-train-lora"
    registered_model: ClassVar[str] = "sonosynth-lora"
    resumable_changes: ClassVar[tuple[str, ...]] = TrainStageConfig.resumable_changes + ("data.reader",)

    data: LoraDataConfig
    """Training examples and how they are packed."""
    model: DiffusionModelConfig = DiffusionModelConfig()
    """Base model (SD 1.5 folder, or the tiny model)."""
    lora: LoraConfig = LoraConfig()
    """Adapters."""
    text_encoder_lr: float = 5e-5
    """Learning rate of the text-encoder LoRA (FU-LoRA: 5e-5); used when lora.text_encoder."""
    cache: CacheConfig = CacheConfig()
    """Latent and text-embedding caches."""
    eval_examples: int = 8
    """Examples in the fixed-noise evaluation loss (eval/loss) logged at the start, at every evaluation
    (engine.eval_every, default at checkpoints) and at the end; 0: no evaluation."""
    preview: PreviewConfig = PreviewConfig()
    """Samples from the trained LoRA."""

    @model_validator(mode="after")
    def _check(self) -> "LoraTrainConfig":
        if self.cache.text and self.lora.text_encoder:
            raise ValueError("cache.text cannot be true while lora.text_encoder trains the text encoder; "
                             "set cache.text to null")
        return self

    @property
    def cache_text(self) -> bool:
        return not self.lora.text_encoder if self.cache.text is None else self.cache.text


class LoraDiffusionModule(torch.nn.Module):
    """The module DeepSpeed wraps: ``forward(batch, generator)`` is the epsilon (or v) MSE."""

    def __init__(self, unet, text_encoder, vae, noise_scheduler, clip_skip: int, vae_scaling: float):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder  # None when prompts are cached
        self.vae = vae  # None when latents are cached
        self.noise_scheduler = noise_scheduler
        self.clip_skip = clip_skip
        self.vae_scaling = vae_scaling

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return encode_prompt_ids(self.text_encoder, input_ids, self.clip_skip)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        latents, noise, t, noisy = noised_latents(batch, self.vae, self.noise_scheduler, self.vae_scaling, generator,
                                                  next(self.unet.parameters()).device)
        emb = batch["text_emb"] if "text_emb" in batch else self.encode_text(batch["input_ids"])
        pred = self.unet(noisy.to(dtype), t, emb.to(dtype)).sample
        return F.mse_loss(pred.float(), diffusion_target(self.noise_scheduler, latents, noise, t).float())


def noised_latents(batch: dict[str, torch.Tensor], vae, noise_scheduler, vae_scaling: float,
                   generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One diffusion training step's input (latents, noise, timesteps, noised latents): a latent drawn
    from the VAE's mean and std (cached in the batch, else encoded by ``vae``), then noise and a timestep
    per example, all from ``generator`` in that order (the LoRA and ControlNet tasks share it)."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixels"].to(next(vae.parameters()).dtype)).latent_dist
        mean, std = dist.mean, dist.std
    shape = mean.shape
    latents = mean.float() + std.float() * torch.randn(shape, generator=generator).to(device)
    latents = latents * vae_scaling
    noise = torch.randn(shape, generator=generator).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (shape[0],), generator=generator).to(device)
    return latents, noise, t, noise_scheduler.add_noise(latents, noise, t)


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity for a v-prediction model."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    return noise


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length, as the UNet's cross-attention expects."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompt_ids(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Prompt embeddings; clip_skip=2 takes the penultimate layer (then the final layer norm).

    transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``), which breaks diffusers'
    own ``clip_skip``; callers pass these embeddings to pipelines instead."""
    out = text_encoder(input_ids, output_hidden_states=clip_skip > 1)
    if clip_skip == 1:
        return out.last_hidden_state
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return norm(out.hidden_states[-clip_skip])


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> HxWx3 uint8."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


EVAL_DRAWS = 4
"""Fixed noise draws per example in the evaluation loss."""


@register_task("lora")
class LoraTask(TrainTask):
    def __init__(self, cfg: LoraTrainConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self.skipped: dict[str, int] = {}
        self.examples: list[Example] = load_examples(cfg.data, cfg.storage, self.skipped)
        parts = build_components(cfg.model)
        self.parts = parts
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.engine.seed)  # the same adapters on every rank and every run
            add_lora(parts.unet, parts.text_encoder, cfg.lora)
        parts.unet.to(ctx.device)
        parts.text_encoder.to(ctx.device)
        parts.vae.to(ctx.device)
        self.vae_scaling = float(parts.vae.config.scaling_factor)
        self.prompts = sorted({e.prompt for e in self.examples})
        self.prompt_row = [self.prompts.index(e.prompt) for e in self.examples]
        self.prompt_ids = tokenize(parts.tokenizer, self.prompts)
        self.text_cache = self._encode_prompts() if cfg.cache_text else None
        self.latent_cache = self._encode_latents() if cfg.cache.latents else None
        # What the caches replace leaves the device (about 650 MB fp32 for SD 1.5's VAE and CLIP).
        if self.latent_cache is not None:
            parts.vae.to("cpu")
        if self.text_cache is not None:
            parts.text_encoder.to("cpu")

    @torch.no_grad()
    def _encode_prompts(self) -> torch.Tensor:
        ids = self.prompt_ids.to(self.ctx.device)
        return encode_prompt_ids(self.parts.text_encoder, ids, self.cfg.model.clip_skip).cpu()

    def _encode_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's (mean, std) of every example, each encoded once in the whole job."""
        def mean_std(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = self.parts.vae.encode(pixels).latent_dist
            return dist.mean, dist.std

        return encode_once(self.ctx, len(self.examples), lambda i: self.examples[i].pixels, mean_std)

    def train_dataset(self) -> ExampleDataset:
        return ExampleDataset(self.examples, self.prompt_row, self.latent_cache)

    def eval_dataset(self) -> ExampleDataset | None:
        """The first ``eval_examples`` training examples, each with fixed noise (the LoRA has no
        validation split: this loss tracks the fit, it selects nothing unless engine.best_metric says so)."""
        n = min(self.cfg.eval_examples, len(self.examples))
        return ExampleDataset(self.examples, self.prompt_row, self.latent_cache, range(n)) if n else None

    def data_skipped(self) -> dict[str, int]:
        return dict(self.skipped)

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"index": torch.tensor([it["index"] for it in items])}
        if "latent_mean" in items[0]:
            out["latent_mean"] = torch.stack([it["latent_mean"] for it in items])
            out["latent_std"] = torch.stack([it["latent_std"] for it in items])
        else:
            out["pixels"] = torch.stack([it["pixels"] for it in items])
        rows = [it["prompt_row"] for it in items]
        if self.text_cache is not None:
            out["text_emb"] = self.text_cache[rows]
        else:
            out["input_ids"] = self.prompt_ids[rows]
        return out

    def module(self) -> LoraDiffusionModule:
        p = self.parts
        module = LoraDiffusionModule(
            p.unet, None if self.text_cache is not None else p.text_encoder,
            None if self.latent_cache is not None else p.vae, p.noise_scheduler, self.cfg.model.clip_skip,
            self.vae_scaling)
        return module

    def param_groups(self, module) -> list[dict]:
        groups = [{"params": lora_parameters(self.parts.unet), "lr": self.cfg.optim.lr}]
        if self.cfg.lora.text_encoder:
            groups.append({"params": lora_parameters(self.parts.text_encoder), "lr": self.cfg.text_encoder_lr})
        return groups

    def eval_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Loss with fixed noise and timesteps per example: comparable across steps."""
        losses = []
        for j, index in enumerate(batch["index"].tolist()):
            one = {k: v[j:j + 1] for k, v in batch.items() if k != "index"}
            for draw in range(EVAL_DRAWS):
                losses.append(module(one, torch.Generator().manual_seed(10_000 * index + draw)))
        return {"eval/loss": (torch.stack(losses).sum(), len(losses))}

    def on_start(self, tracker) -> None:
        images = [to_uint8(e.pixels) for e in self.examples[:8]]
        tracker.log_image(tile_images(images, cols=4), "inputs.png")
        tracker.log_text("\n".join(f"{e.key}\t{e.plane}\t{e.prompt}" for e in self.examples), "examples.tsv")

    def export(self, module, folder: Path, tracker) -> dict[str, Any]:
        weights = save_lora(folder, module.unet, module.text_encoder or self.parts.text_encoder, self.cfg.lora)
        lineage = {
            "base_model": self.cfg.model.identity(), "mode": self.cfg.data.mode,
            "prompts": self.prompts, "dataset": self.cfg.data.dataset, "examples": len(self.examples),
            "rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha or self.cfg.lora.rank,
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "clip_skip": self.cfg.model.clip_skip, "resolution": self.cfg.data.resolution,
            "class_prompts": {e.plane: e.prompt for e in self.examples} if self.cfg.data.mode == "class" else {},
        }
        if self.cfg.preview.num:
            sheet = self.preview(folder)
            tracker.log_image(sheet, "previews/final.png")
            self.ctx.storage.put_bytes("previews/final.png", encode_png(sheet))
        return lineage

    def preview(self, lora_folder: Path) -> np.ndarray:
        """Sample with a fresh fp32 base pipeline + the exported LoRA: what users will load."""
        from diffusers import DPMSolverMultistepScheduler

        pipe = build_pipeline(self.cfg.model)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(str(lora_folder), weight_name=WEIGHTS_NAME, use_safetensors=True)
        pipe.to(self.ctx.device)
        pipe.set_progress_bar_config(disable=True)
        p = self.cfg.preview
        prompts = [self.prompts[i % len(self.prompts)] for i in range(p.num)]
        res = self.cfg.data.resolution
        with torch.no_grad():
            tokens = tokenize(pipe.tokenizer, prompts + [""]).to(self.ctx.device)
            emb = encode_prompt_ids(pipe.text_encoder, tokens, self.cfg.model.clip_skip)
        images = pipe(prompt_embeds=emb[:-1], negative_prompt_embeds=emb[-1:].expand(len(prompts), -1, -1),
                      height=res, width=res, num_inference_steps=p.steps, guidance_scale=p.guidance,
                      generator=torch.Generator().manual_seed(p.seed), output_type="np").images
        return tile_images([(im * 255).round().astype(np.uint8) for im in images], cols=4)

