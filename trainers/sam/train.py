"""The ``train-sam`` stage: fine-tune SAM on a mix of real and synthetic image+mask datasets.

A ``TrainTask`` of the shared engine (``docs/architecture.md``): the engine runs the loop,
DeepSpeed, checkpoints, resume, evaluation, best-checkpoint selection and MLflow; this
module says what SAM's data, forward, metric and export are. The recipe's sections are in
``config``, the data in ``data``, the module DeepSpeed wraps in ``module``.

- **Data.** Named sources (``data.sources.real``, ``data.sources.synthetic``, ...), each a
  dataset (folder or ``s3://``, from ingest or generate) with a split and a count (or a
  fraction of its size, converted to a count): the mix's seeded choice (``data.seed``,
  ``sonosynth.datasets.mix``) decides which samples, the same in every run, and a smaller
  count takes a subset of a larger one's. Only samples with a mask are used. Each image and
  mask is resized so its longest side is ``data.image_size`` (paper A: 256), then augmented
  with one paired draw (``data.augment.preset``: none, weak, strong), then the box prompt is
  taken from the **augmented** mask with each side pushed out by 0..``box_jitter_px`` px at
  256 px scale, then SAM's own preprocessing (longest side to the encoder's input, normalise,
  pad). The draw of every example comes from the engine's per-example seeding, so a resumed
  job sees the same examples. A damaged shard stops the job naming it; with
  ``data.reader.on_error: skip`` its samples are left out and counted (``data/skipped/<reason>``).
- **Validation.** The ``val`` split of the ``real`` source's dataset (or ``data.val``),
  never test, unaugmented, one fixed box per image: ``val/dice`` (MONAI ``compute_dice`` of
  the thresholded low-res logits, per image, empty-vs-empty = 1) and ``val/loss`` choose the
  exported checkpoint (``engine.best_metric``, default ``val/dice``).
- **Modes.** ``decoder``: only the mask decoder trains (paper A). ``lora``: the decoder and
  peft LoRA adapters on the image encoder's attention (``qkv``). ``full``: everything.
- **Embedding cache.** With the image encoder frozen (``decoder``) and no augmentation, each
  image is embedded once and steps run only the prompt encoder and the mask decoder. With
  augmentation the encoder runs every step (on unaugmented validation images the cache is
  kept). ``cache_embeddings`` forces either way where it is possible. The embeddings live on each
  node's local disk (``embedding_cache``, ``trainers.embedding_store``): float16 by default, one
  file per build shared by the node's ranks, each encoding its share, read row by row so a rank's
  memory does not grow with the set, and reused by later jobs (a sweep's cells) per image: the
  store is keyed by the encoder's weights (the checkpoint's sha256), the encoder's input size,
  ``data.image_size``, ``data.PREPROCESS_VERSION`` and the dtype, an image by its dataset, key and
  bytes. ``embedding_cache.in_memory`` holds them in every rank's memory instead.
- **Loss.** MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)`` on the low-res logits
  against the mask in that frame (paper A).
- **Export.** ``model/sam_finetuned.pt`` (``trainers.sam.models.FORMAT``), with the engine's
  ``config.yaml`` and ``lineage.json``, registered in MLflow as ``sonosynth-sam``;
  ``sonosynth.trainers.sam.load_sam_model`` loads it back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import model_validator

from sonosynth.datasets.augment import PairedAugment, box_from_mask
from sonosynth.datasets.mix import mix_lineage, open_mix
from sonosynth.datasets.reader import add_skipped
from sonosynth.trainers.config import TrainStageConfig
from sonosynth.trainers.embedding_store import CacheReport, EmbeddingCacheConfig, cached_embeddings
from sonosynth.trainers.sam.config import SamDataConfig, SamLoraConfig, SamLossConfig
from sonosynth.trainers.sam.data import PREPROCESS_VERSION, Embeddings, SamExamples, image_identities, plan_sam_data
from sonosynth.trainers.sam.models import FORMAT, WEIGHTS_FILE, SamModelConfig, build_sam, embed, sha256_file
from sonosynth.trainers.sam.module import SamTrainModule, add_encoder_lora, batch_dice
from sonosynth.trainers.task import TrainTask, WorkerContext
from sonosynth.trainers.tasks import register_task


class SamTrainConfig(TrainStageConfig):
    """``sonosynth train-sam``: recipe fields below, engine/optim/tracking from the base."""

    task: ClassVar[str] = "sam"
    stage: ClassVar[str] = "train-sam"
    experiment: ClassVar[str] = "sonosynth-train-sam"
    registered_model: ClassVar[str] = "sonosynth-sam"
    resumable_changes: ClassVar[tuple[str, ...]] = TrainStageConfig.resumable_changes + (
        "data.cache_dir", "data.reader", "embedding_cache.dir", "embedding_cache.in_memory")
    engine_defaults: ClassVar[dict[str, Any]] = {"epochs": 20, "micro_batch": 5, "best_metric": "val/dice",
                                                 "best_mode": "max"}
    """Paper A's 20 epochs at micro-batch 5, the checkpoint with the best val/dice exported
    (engine.best_metric; null exports the last step)."""

    data: SamDataConfig
    """Training mix, validation split, image size, augmentation and box prompts."""
    model: SamModelConfig = SamModelConfig()
    """The SAM to fine-tune (vit_b from model.checkpoint for paper A, or the tiny one)."""
    mode: Literal["decoder", "lora", "full"] = "decoder"
    """decoder: train the mask decoder only (paper A); lora: also LoRA adapters on the image encoder's
    attention; full: every weight."""
    lora: SamLoraConfig = SamLoraConfig()
    """Adapters of mode lora."""
    cache_embeddings: bool | None = None
    """Embed each image once instead of every step. Null: on when the encoder is frozen (mode decoder)
    and augmentation is none (validation images are then cached too, augmented or not)."""
    embedding_cache: EmbeddingCacheConfig = EmbeddingCacheConfig()
    """Where the cached embeddings are kept (each node's local disk, float16) and reused across jobs."""
    loss: SamLossConfig = SamLossConfig()
    """Loss weights."""

    @model_validator(mode="after")
    def _check(self) -> "SamTrainConfig":
        if self.cache_embeddings and self.mode != "decoder":
            raise ValueError(f"cache_embeddings=true needs a frozen image encoder, and mode {self.mode} trains it; "
                             "set cache_embeddings=null or mode=decoder")
        if self.cache_embeddings and self.data.augment.preset != "none":
            raise ValueError(f"cache_embeddings=true with augmentation {self.data.augment.preset}: augmented "
                             "images change every step, so they cannot be embedded once; set cache_embeddings=null")
        return self

    @property
    def encoder_frozen(self) -> bool:
        return self.mode == "decoder"

    @property
    def cache_train(self) -> bool:
        """Whether training examples use cached embeddings."""
        if self.cache_embeddings is not None:
            return self.cache_embeddings
        return self.encoder_frozen and self.data.augment.preset == "none"

    @property
    def cache_val(self) -> bool:
        """Whether validation examples (never augmented) use cached embeddings."""
        return self.encoder_frozen and self.cache_embeddings is not False


def lora_adapters(image_encoder: torch.nn.Module, prefix: str = "image_encoder.") -> dict[str, dict]:
    """{Sam key of each adapted Linear: {A, B, scale}} (``models.FORMAT``)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in image_encoder.named_modules():
        if isinstance(m, LoraLayer):
            out[prefix + name] = {"A": m.lora_A["default"].weight.detach().float().cpu().clone(),
                                  "B": m.lora_B["default"].weight.detach().float().cpu().clone(),
                                  "scale": float(m.scaling["default"])}
    return out


def finetuned_payload(module: SamTrainModule, mode: str) -> dict[str, Any]:
    """What ``sam_finetuned.pt`` holds for ``mode`` (``models.FORMAT``)."""
    state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
             for k, v in module.state_dict().items()}
    if mode == "full":
        kept = state
    else:
        kept = {k: v for k, v in state.items() if k.startswith(("mask_decoder.", "prompt_encoder."))}
    payload = {"format": FORMAT, "mode": mode, "state_dict": kept}
    if mode == "lora":
        payload["lora"] = lora_adapters(module.image_encoder)
    return payload


@register_task("sam")
class SamTask(TrainTask):
    def __init__(self, cfg: SamTrainConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        d = cfg.data
        sam = build_sam(cfg.model)  # seeded: the same weights on every rank
        sam.requires_grad_(cfg.mode == "full")
        sam.mask_decoder.requires_grad_(True)
        if cfg.mode == "lora":
            add_encoder_lora(sam.image_encoder, cfg.lora, cfg.engine.seed)
        self.sam = sam.to(ctx.device)
        self.model_size = sam.image_encoder.img_size
        self.low_res = sam.prompt_encoder.mask_input_size[0]

        self.train_parts, self.val_part = plan_sam_data(d, cfg.storage)
        self.train_source = open_mix(self.train_parts, cfg.storage, d.cache_dir, on_error=d.reader.on_error)
        self.val_source = open_mix([self.val_part], cfg.storage, d.cache_dir, on_error=d.reader.on_error)
        common = dict(work_size=d.image_size, model_size=self.model_size, low_res=self.low_res,
                      jitter_px=d.augment.box_jitter_px, seed=cfg.engine.seed)
        self.train_examples = SamExamples(self.train_source, augment=PairedAugment(d.augment.preset, cfg.engine.seed),
                                          fixed=False, **common)
        self.val_examples = SamExamples(self.val_source, augment=PairedAugment("none"), fixed=True, **common)
        t0 = time.perf_counter()
        self._store_key: dict[str, Any] | None = None
        self.cache_reports: dict[str, CacheReport] = {}
        if cfg.cache_train and len(self.train_examples):
            self.train_examples.embeddings = self._embed_all(self.train_examples, "train")
        if cfg.cache_val and len(self.val_examples):
            self.val_examples.embeddings = self._embed_all(self.val_examples, "val")
        self.cache_seconds = time.perf_counter() - t0
        self.encoder_needed = not cfg.cache_train  # (a cached training set implies a cached validation set)
        if not self.encoder_needed:
            sam.image_encoder.to("cpu")  # what the cache replaces leaves the device (ViT-B: ~350 MB)

    def _embed_all(self, examples: SamExamples, split: str) -> Embeddings:
        """The frozen encoder's embedding of every example's unaugmented image (``build_sam``'s
        model is in eval mode), from the node's embedding store."""
        pe = self.sam.prompt_encoder
        rows, self.cache_reports[split] = cached_embeddings(
            self.ctx, self.cfg.embedding_cache, n=len(examples), row_shape=(pe.embed_dim, *pe.image_embedding_size),
            key=self.store_key, identities=lambda: image_identities(examples.source), load=examples.image,
            encode=lambda images: embed(self.sam, images))
        return rows

    def store_key(self) -> dict[str, Any]:
        """What the cached embeddings depend on besides the image: the encoder's weights (the
        checkpoint's sha256, or a random model's identity) and the preprocessing."""
        if self._store_key is None:
            model = self.cfg.model
            weights = f"sha256:{sha256_file(model.checkpoint)}" if model.checkpoint else model.identity()
            self._store_key = {"encoder": "sam-image-encoder", "arch": model.arch, "weights": weights,
                               "encoder_input": self.model_size, "image_size": self.cfg.data.image_size,
                               "preprocess": PREPROCESS_VERSION}
        return self._store_key

    def cache_lineage(self) -> dict[str, Any] | None:
        """Which store the embeddings came from and how many images were reused (this node's figures)."""
        if not self.cache_reports:
            return None
        return {"in_memory": self.cfg.embedding_cache.in_memory,
                **{split: r.lineage() for split, r in self.cache_reports.items()}}

    def train_dataset(self) -> SamExamples:
        return self.train_examples

    def eval_dataset(self) -> SamExamples:
        return self.val_examples

    def module(self) -> SamTrainModule:
        return SamTrainModule(self.sam, with_encoder=self.encoder_needed, encoder_grad=not self.cfg.encoder_frozen,
                              loss=self.cfg.loss)

    def data_skipped(self) -> dict[str, int]:
        return add_skipped([self.train_source.skipped, self.val_source.skipped])

    def eval_step(self, module: SamTrainModule, batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
        logits = module.logits(batch).float()
        target = batch["target"].float()
        dice = batch_dice(logits, target)
        losses = torch.stack([module.loss(logits[i:i + 1], target[i:i + 1]) for i in range(len(logits))])
        return {"val/dice": (dice.sum(), len(dice)), "val/loss": (losses.sum(), len(losses))}

    def on_start(self, tracker) -> None:
        from sonosynth.datasets.preview import tile_images
        from sonosynth.trainers.evaluation.segmentation import overlay

        tiles = []
        for i in range(min(8, len(self.train_examples))):
            key, image, mask = self.train_examples.raw(i)
            box = box_from_mask(mask, 0)
            tiles.append(overlay(image, mask > 0, np.zeros_like(mask, bool), box))
        if tiles:
            size = max(max(t.shape[:2]) for t in tiles)
            tiles = [np.pad(t, ((0, size - t.shape[0]), (0, size - t.shape[1]), (0, 0))) for t in tiles]
            tracker.log_image(tile_images(tiles, cols=4), "inputs.png")
        tracker.log_text("\n".join(self.train_source.keys()), "train_keys.txt")
        tracker.log_text("\n".join(self.val_source.keys()), "val_keys.txt")
        tracker.log_params({f"data.examples.{p.name}": len(p.keys) for p in self.train_parts})

    def export(self, module: SamTrainModule, folder: Path, tracker) -> dict[str, Any]:
        cfg = self.cfg
        path = folder / WEIGHTS_FILE
        torch.save(finetuned_payload(module, cfg.mode), path)
        ckpt = cfg.model.checkpoint
        return {
            "format": FORMAT, "mode": cfg.mode, "base_model": cfg.model.identity(), "arch": cfg.model.arch,
            "base_checkpoint_sha256": sha256_file(ckpt) if ckpt and cfg.mode != "full" else None,
            "sources": mix_lineage(self.train_parts), "val": self.val_part.lineage(),
            "examples": len(self.train_examples), "val_examples": len(self.val_examples),
            "image_size": cfg.data.image_size, "model_input_size": self.model_size,
            "augment": cfg.data.augment.preset, "box_jitter_px": cfg.data.augment.box_jitter_px,
            "cached_embeddings": cfg.cache_train, "cache_seconds": round(self.cache_seconds, 3),
            "embedding_cache": self.cache_lineage(),
            "cache_reused_images": sum(r.reused for r in self.cache_reports.values()),
            "lora": cfg.lora.to_dict() if cfg.mode == "lora" else None,
            "weights_sha256": sha256_file(path),
        }
