"""The ``train-controlnet`` stage: a ControlNet that draws a fetal head image for a given head mask.

A ``TrainTask`` of the shared engine (``docs/architecture.md``), built like the LoRA's: the
base model (optionally with a trained LoRA fused in, ``models.base_components``) is frozen,
latents and the prompt's embedding are computed once and cached (latents with the engine's
``encode_once``; encoded every step instead when the examples are augmented), and each step
runs the ControlNet on the noisy latent and the mask's conditioning image
(``conditioning.mask_to_condition``) and the frozen UNet with the ControlNet's residuals: the
epsilon MSE trains the ControlNet's parameters alone. The evaluation is the same loss with
fixed noise per example (``eval/loss``).

Export (rank 0): ``ControlNetModel.save_pretrained`` (``config.json`` +
``diffusion_pytorch_model.safetensors``) in ``OUT/model`` with the engine's ``lineage.json``
(``kind: controlnet``, the base model, the fused LoRA and its sha256, resolution, prompt,
conditioning, clip skip, dataset, weights sha256) and ``config.yaml``, registered in MLflow as
``sonosynth-controlnet``; a preview sheet (masks and the images a plain diffusers
``StableDiffusionControlNetPipeline`` with the exported ControlNet draws for them) is logged
and written to ``OUT/previews/final.png``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import model_validator

from sonosynth.datasets.preview import tile_images
from sonosynth.datasets.records import encode_png
from sonosynth.trainers.config import TrainStageConfig
from sonosynth.trainers.controlnet.conditioning import CONDITIONING, LINEAGE_KIND, WEIGHTS_NAME, mask_to_condition
from sonosynth.trainers.controlnet.data import ControlNetDataConfig, GeometricAugment, PairDataset, load_pairs
from sonosynth.trainers.controlnet.models import (ControlNetConfig, ControlNetDiffusionModule, base_components,
                                                  build_controlnet, controlnet_pipeline, vae_downscale)
from sonosynth.trainers.diffusion.models import DiffusionModelConfig
from sonosynth.trainers.diffusion.train import EVAL_DRAWS, PreviewConfig, encode_prompt_ids, to_uint8, tokenize
from sonosynth.trainers.task import TrainTask, WorkerContext, encode_once
from sonosynth.trainers.tasks import register_task

log = logging.getLogger(__name__)


class ControlNetPreviewConfig(PreviewConfig):
    """Images drawn by the exported ControlNet for the first training masks, logged and written to out."""

    num: int = 4
    """How many masks (0: no preview)."""


class ControlNetTrainConfig(TrainStageConfig):
    """``sonosynth train-controlnet``: recipe fields below, engine/optim/tracking from the base."""

    task: ClassVar[str] = "controlnet"
    stage: ClassVar[str] = "train-controlnet"
    experiment: ClassVar[str] = "sonosynth-train-controlnet"
    registered_model: ClassVar[str] = "sonosynth-controlnet"
    resumable_changes: ClassVar[tuple[str, ...]] = TrainStageConfig.resumable_changes + ("data.reader",)

    data: ControlNetDataConfig
    """Training image+mask pairs, their size, prompt and augmentation."""
    model: DiffusionModelConfig = DiffusionModelConfig()
    """Base model (SD 1.5 folder, or the tiny model); it stays frozen."""
    lora: str | None = None
    """A trained LoRA fused into the base model before the ControlNet is made from its UNet: a folder
    (local or s3://) or MLflow URI (models:/sonosynth-lora@champion); null: the base model alone."""
    lora_scale: float = 1.0
    """Strength of the fused LoRA; sample with the same sampler.lora_scale."""
    controlnet: ControlNetConfig = ControlNetConfig()
    """The ControlNet made from the base UNet."""
    cache_latents: bool | None = None
    """Encode every example through the frozen VAE once. Null: on unless data.augment is enabled
    (augmented images change every step, so they are encoded every step)."""
    eval_examples: int = 8
    """Examples in the fixed-noise evaluation loss (eval/loss) logged at the start, at every evaluation
    (engine.eval_every, default at checkpoints) and at the end; 0: no evaluation."""
    preview: ControlNetPreviewConfig = ControlNetPreviewConfig()
    """Samples from the exported ControlNet."""

    @model_validator(mode="after")
    def _check(self) -> "ControlNetTrainConfig":
        if self.cache_latents and self.data.augment.enabled:
            raise ValueError("cache_latents=true with data.augment.enabled: augmented images change every step, so "
                             "their latents cannot be encoded once; set cache_latents=null")
        latent, mask = vae_downscale(self.model), self.controlnet.downscale()
        if latent != mask:
            raise ValueError(
                f"controlnet.conditioning_channels has {len(self.controlnet.conditioning_channels)} entries, so the "
                f"mask encoder shrinks the mask {mask}x, but the base model's latents are {latent}x smaller than "
                f"the image: give it {latent.bit_length()} entries, e.g. [16, 32, 96, 256] for SD")
        if self.lora is not None and not self.lora.strip():
            raise ValueError("lora is empty; give a train-lora model folder, s3:// prefix or MLflow URI, or null")
        if self.lora and "://" not in self.lora and not self.lora.startswith("models:/") \
                and not Path(self.lora).expanduser().is_dir():
            raise ValueError(f"lora={self.lora} is not a folder; give the model/ folder of a train-lora run, "
                             "an s3:// prefix or an MLflow URI (models:/sonosynth-lora@champion), or null")
        if self.eval_examples < 0:
            raise ValueError("eval_examples must be 0 (no evaluation) or more")
        return self

    @property
    def caches_latents(self) -> bool:
        return not self.data.augment.enabled if self.cache_latents is None else self.cache_latents


@register_task("controlnet")
class ControlNetTask(TrainTask):
    def __init__(self, cfg: ControlNetTrainConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self.skipped: dict[str, int] = {}
        self.pairs = load_pairs(cfg.data, cfg.storage, self.skipped)
        self.lora_dir, self.lora_sha256 = self._fetch_lora()
        parts = base_components(cfg.model, self.lora_dir, cfg.lora_scale)
        self.parts = parts
        self.controlnet = build_controlnet(parts.unet, cfg.controlnet, cfg.engine.seed)
        for module in (parts.unet, parts.text_encoder, parts.vae, self.controlnet):
            module.to(ctx.device)
        self.vae_scaling = float(parts.vae.config.scaling_factor)
        with torch.no_grad():
            ids = tokenize(parts.tokenizer, [cfg.data.prompt]).to(ctx.device)
            self.text_emb = encode_prompt_ids(parts.text_encoder, ids, cfg.model.clip_skip).float().cpu()
        self.latent_cache = self._encode_latents() if cfg.caches_latents else None
        self.augment = GeometricAugment(cfg.data.augment, cfg.data.resolution) if cfg.data.augment.enabled else None
        # What the caches replace leaves the device (about 650 MB fp32 for SD 1.5's VAE and CLIP).
        parts.text_encoder.to("cpu")
        if self.latent_cache is not None:
            parts.vae.to("cpu")

    def _fetch_lora(self) -> tuple[Path | None, str | None]:
        if not self.cfg.lora:
            return None, None
        from sonosynth.trainers.diffusion.sampler import read_lineage, resolve_lora

        folder, sha = resolve_lora(self.cfg.lora, self.cfg.tracking.resolved_uri())
        trained_on = read_lineage(folder).get("base_model")
        if trained_on and trained_on != self.cfg.model.identity() and self.ctx.is_main:
            log.warning("the LoRA %s was trained on %s and is fused into %s here; set model.pretrained to the "
                        "LoRA's base model unless both are the same weights", self.cfg.lora, trained_on,
                        self.cfg.model.identity())
        return folder, sha

    def _encode_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's (mean, std) of every pair's image, each encoded once in the whole job."""
        def mean_std(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = self.parts.vae.encode(pixels).latent_dist
            return dist.mean, dist.std

        return encode_once(self.ctx, len(self.pairs), lambda i: self.pairs[i].pixels(), mean_std)

    def train_dataset(self) -> PairDataset:
        return PairDataset(self.pairs, self.latent_cache, augment=self.augment)

    def eval_dataset(self) -> PairDataset | None:
        """The first ``eval_examples`` pairs, unaugmented, each with fixed noise (this loss tracks the
        fit; it selects nothing unless engine.best_metric says so)."""
        n = min(self.cfg.eval_examples, len(self.pairs))
        return PairDataset(self.pairs, self.latent_cache, range(n)) if n else None

    def data_skipped(self) -> dict[str, int]:
        return dict(self.skipped)

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        out = {"index": torch.tensor([it["index"] for it in items]),
               "condition": torch.stack([it["condition"] for it in items]),
               "text_emb": self.text_emb.expand(len(items), -1, -1).contiguous()}
        if "latent_mean" in items[0]:
            out["latent_mean"] = torch.stack([it["latent_mean"] for it in items])
            out["latent_std"] = torch.stack([it["latent_std"] for it in items])
        else:
            out["pixels"] = torch.stack([it["pixels"] for it in items])
        return out

    def module(self) -> ControlNetDiffusionModule:
        return ControlNetDiffusionModule(self.controlnet, self.parts.unet,
                                         None if self.latent_cache is not None else self.parts.vae,
                                         self.parts.noise_scheduler, self.vae_scaling)

    def param_groups(self, module) -> list[dict]:
        return [{"params": [p for p in module.controlnet.parameters() if p.requires_grad], "lr": self.cfg.optim.lr}]

    def eval_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Loss with fixed noise and timesteps per example: comparable across steps."""
        losses = []
        for j, index in enumerate(batch["index"].tolist()):
            one = {k: v[j:j + 1] for k, v in batch.items() if k != "index"}
            for draw in range(EVAL_DRAWS):
                losses.append(module(one, torch.Generator().manual_seed(10_000 * index + draw)))
        return {"eval/loss": (torch.stack(losses).sum(), len(losses))}

    def on_start(self, tracker) -> None:
        shown = self.pairs[:4]
        tiles = [to_uint8(p.pixels()) for p in shown] + [mask_tile(p.mask) for p in shown]
        tracker.log_image(tile_images(tiles, cols=len(shown)), "inputs.png")
        tracker.log_text("\n".join(p.key for p in self.pairs), "examples.tsv")

    def export(self, module, folder: Path, tracker) -> dict[str, Any]:
        from diffusers import ControlNetModel

        trained = module.controlnet
        exported = ControlNetModel.from_config(trained.config)  # a float32 CPU copy, whatever the training dtype
        exported.load_state_dict({k: v.detach().float().cpu() for k, v in trained.state_dict().items()})
        exported.save_pretrained(str(folder), safe_serialization=True)
        weights = folder / WEIGHTS_NAME
        lineage = {
            "kind": LINEAGE_KIND, "base_model": self.cfg.model.identity(), "lora": self.cfg.lora,
            "lora_sha256": self.lora_sha256, "lora_scale": self.cfg.lora_scale if self.cfg.lora else None,
            "resolution": self.cfg.data.resolution, "resize": self.cfg.data.resize, "prompt": self.cfg.data.prompt,
            "conditioning": CONDITIONING, "clip_skip": self.cfg.model.clip_skip, "dataset": self.cfg.data.dataset,
            "examples": len(self.pairs), "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        }
        if self.cfg.preview.num:
            sheet = self.preview(folder)
            tracker.log_image(sheet, "previews/final.png")
            self.ctx.storage.put_bytes("previews/final.png", encode_png(sheet))
        return lineage

    def preview(self, folder: Path) -> np.ndarray:
        """Masks of the first pairs beside what a fresh fp32 base pipeline with the exported ControlNet
        draws for them: what users will load."""
        from diffusers import ControlNetModel, DPMSolverMultistepScheduler

        parts = base_components(self.cfg.model, self.lora_dir, self.cfg.lora_scale)
        controlnet = ControlNetModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
        pipe = controlnet_pipeline(parts, controlnet, DPMSolverMultistepScheduler.from_config(
            parts.noise_scheduler.config))
        masks = [self.pairs[i % len(self.pairs)].mask for i in range(self.cfg.preview.num)]
        images = draw_for_masks(pipe, masks, self.cfg.data.prompt, self.cfg.model.clip_skip, self.cfg.preview,
                                self.ctx.device)
        return preview_sheet(masks, images)


def mask_tile(mask: np.ndarray) -> np.ndarray:
    """A mask as an HxWx3 uint8 image (0/255)."""
    return (mask_to_condition(mask) * 255).astype(np.uint8)


def preview_sheet(masks: list[np.ndarray], images: list[np.ndarray]) -> np.ndarray:
    """Each mask beside the image drawn for it, up to four pairs a row."""
    tiles = [tile for mask, image in zip(masks, images) for tile in (mask_tile(mask), image)]
    return tile_images(tiles, cols=2 * min(len(masks), 4))


@torch.no_grad()
def draw_for_masks(pipe, masks: list[np.ndarray], prompt: str, clip_skip: int, preview: ControlNetPreviewConfig,
                   device: torch.device | str = "cpu") -> list[np.ndarray]:
    """HxWx3 uint8 images ``pipe`` (a StableDiffusionControlNetPipeline) draws for ``masks`` (HxW, the
    sampling size), one batch, seeded by ``preview.seed``."""
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    tokens = tokenize(pipe.tokenizer, [prompt, ""]).to(device)
    emb = encode_prompt_ids(pipe.text_encoder, tokens, clip_skip)
    n, (height, width) = len(masks), masks[0].shape
    images = pipe(prompt_embeds=emb[:1].expand(n, -1, -1), negative_prompt_embeds=emb[1:].expand(n, -1, -1),
                  image=[mask_to_condition(m) for m in masks], height=height, width=width,
                  num_inference_steps=preview.steps, guidance_scale=preview.guidance,
                  generator=torch.Generator().manual_seed(preview.seed), output_type="np").images
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
