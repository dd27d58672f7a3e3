"""The ``train-sam`` stage: fine-tune SAM on a mix of real and synthetic image+mask datasets.

A ``TrainTask`` of the shared engine (``docs/architecture.md``): the engine runs the loop,
DeepSpeed, checkpoints, resume, evaluation, best-checkpoint selection and MLflow; this
module says what SAM's data, forward, metric and export are.

- **Data.** Named sources (``data.sources.real``, ``data.sources.synthetic``, ...), each a
  dataset (folder or ``s3://``, from ingest or generate) with a split and a count (or a
  fraction of its size, converted to a count): a seeded choice (``data.seed``) decides which
  samples, the same in every run. Only samples with a mask are used. Each image and mask is
  resized so its longest side is ``data.image_size`` (paper A: 256), then augmented with one
  paired draw (``data.augment.preset``: none, weak, strong), then the box prompt is taken
  from the **augmented** mask with each side pushed out by 0..``box_jitter_px`` px at 256 px
  scale, then SAM's own preprocessing (longest side to the encoder's input, normalise, pad).
  The draw of every example comes from the engine's per-example seeding, so a resumed job
  sees the same examples.
- **Validation.** The ``val`` split of the ``real`` source's dataset (or ``data.val``),
  never test, unaugmented, one fixed box per image: ``val/dice`` (MONAI ``compute_dice`` of
  the thresholded low-res logits, per image, empty-vs-empty = 1) and ``val/loss`` choose the
  exported checkpoint (``engine.best_metric``, default ``val/dice``).
- **Modes.** ``decoder``: only the mask decoder trains (paper A). ``lora``: the decoder and
  peft LoRA adapters on the image encoder's attention (``qkv``). ``full``: everything.
- **Embedding cache.** With the image encoder frozen (``decoder``) and no augmentation, each
  rank embeds its share of the examples once and the shares are gathered (as the LoRA task
  caches latents); steps then run only the prompt encoder and the mask decoder. With
  augmentation the encoder runs every step (on unaugmented validation images the cache is
  kept). ``cache_embeddings`` forces either way where it is possible.
- **Loss.** MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)`` on the low-res logits
  against the mask in that frame (paper A).
- **Export.** ``model/sam_finetuned.pt`` (``trainers.sam.models.FORMAT``), with the engine's
  ``config.yaml`` and ``lineage.json``, registered in MLflow as ``sonosynth-sam``;
  ``sonosynth.trainers.sam.load_sam_model`` loads it back.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import field_validator, model_validator
from torch.utils.data import Dataset

from sonosynth.datasets.augment import (AugmentConfig, PairedAugment, box_from_mask, boxes_to_input, draw_seed,
                                        full_box, logit_target, preprocess_shape, resize_mask, sam_preprocess)
from sonosynth.infra.config import Config, ConfigError
from sonosynth.trainers.config import EngineConfig, TrainStageConfig
from sonosynth.trainers.task import TrainTask, WorkerContext
from sonosynth.trainers.sam.models import (FORMAT, WEIGHTS_FILE, SamModelConfig, build_sam, embed, resize_image,
                                           sam_forward, sha256_file)
from sonosynth.trainers.tasks import register_task

REAL = "real"
"""The source whose dataset gives the default validation split (else the first source)."""
ENGINE_DEFAULTS = {"epochs": 20, "micro_batch": 5, "best_metric": "val/dice", "best_mode": "max"}


class SamSourceConfig(Config):
    """One dataset of the training mix and how many of its samples to take."""

    dataset: str
    """Dataset folder or s3:// prefix (from ingest or generate)."""
    split: str | None = "train"
    """Take samples of this split (null: every split; only for datasets without held-out samples,
    e.g. generate's output, whose samples are all train)."""
    count: int | None = None
    """Take exactly this many samples (seeded by data.seed: the same ones in every run); null takes
    every sample with a mask; 0 leaves the source out (e.g. paper A's baseline without synthetic)."""
    fraction: float | None = None
    """Instead of count: this fraction of the source's samples with a mask (rounded to a count)."""

    @model_validator(mode="after")
    def _check(self) -> "SamSourceConfig":
        if self.count is not None and self.fraction is not None:
            raise ValueError("give count or fraction, not both")
        if self.count is not None and self.count < 0:
            raise ValueError("count must be 0 or more (0 leaves the source out; null takes all)")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError("fraction must be in (0, 1], e.g. 0.5")
        if self.split == "test":
            raise ValueError("training on the test split would leak it into the scores; use split train "
                             "(evaluate the model on test with `sonosynth evaluate`)")
        return self

    def wanted(self, available: int) -> int | None:
        """How many samples to take of ``available`` (None: all of them)."""
        if self.fraction is not None:
            return max(1, round(self.fraction * available)) if available else 0
        return self.count


class SamValConfig(Config):
    """The validation split the exported checkpoint is chosen on (never test)."""

    dataset: str | None = None
    """Dataset folder or s3:// prefix; null: the dataset of the source named real (else the first)."""
    split: str = "val"
    """Split to validate on; 'test' is refused (model selection on test inflates its scores)."""
    count: int | None = None
    """Use at most this many of its samples with a mask (seeded choice); null: all."""

    def wanted(self, available: int) -> int | None:
        """How many of ``available`` samples to validate on (None: all of them)."""
        return None if self.count is None else min(self.count, available)

    @field_validator("split")
    @classmethod
    def _not_test(cls, v: str) -> str:
        if v == "test":
            raise ValueError("the checkpoint is chosen on this split, so it must not be test; use val")
        return v


class SamDataConfig(Config):
    """The training mix, the validation split, image size, augmentation and box prompts."""

    sources: dict[str, SamSourceConfig]
    """Named datasets of the training mix, e.g. {real: {dataset: runs/hc18, count: 20}, synthetic:
    {dataset: runs/syn, count: 495}}. The CLI's --dataset sets sources.real.dataset and --synthetic
    sources.synthetic.dataset; --set data.sources.synthetic.count=0 leaves a source out."""
    val: SamValConfig = SamValConfig()
    """Validation split (default: the val split of the real source's dataset)."""
    image_size: int | None = 256
    """Resize images and masks so their longest side is this before augmentation (paper A: 256;
    box jitter and augmentation sizes are given at 256 px); null: native size. SAM's preprocessing
    then resizes to the encoder's input (1024 for vit_b). Prediction resizes the same way."""
    augment: AugmentConfig = AugmentConfig()
    """Paired augmentation preset (none, weak, strong) and the box-prompt jitter (0-19 px at 256 px)."""
    seed: int = 0
    """Seed of which samples each source's count takes."""
    cache_dir: str | None = None
    """Local folder for s3:// shards (default $SONOSYNTH_CACHE_DIR or ~/.cache/sonosynth/shards)."""

    @model_validator(mode="after")
    def _check(self) -> "SamDataConfig":
        if not self.sources:
            raise ValueError("data.sources is empty; give at least one, e.g. --dataset runs/hc18 "
                             "(data.sources.real.dataset)")
        if all(s.count == 0 for s in self.sources.values()):
            raise ValueError("every source has count 0; give one a count (null takes all of it)")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError("image_size must be at least 16 (paper A: 256), or null for native size")
        val = self.val_dataset
        for name, s in self.sources.items():
            if s.dataset == val and (s.split is None or s.split == self.val.split) and s.count != 0:
                raise ValueError(f"data.sources.{name} trains on split {s.split!r} of {s.dataset}, which holds the "
                                 f"validation split {self.val.split!r}; set data.sources.{name}.split=train")
        return self

    @property
    def val_dataset(self) -> str:
        if self.val.dataset:
            return self.val.dataset
        first = self.sources.get(REAL) or next(iter(self.sources.values()))
        return first.dataset


class SamLoraConfig(Config):
    """LoRA adapters on the image encoder's attention (mode lora), with peft."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank (null: alpha = rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["qkv"]
    """Linear layers of the image encoder that get adapters (segment_anything's attention: qkv, proj)."""

    @model_validator(mode="after")
    def _check(self) -> "SamLoraConfig":
        if self.rank < 1:
            raise ValueError("rank must be at least 1, e.g. 8")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules is empty; segment_anything's attention has qkv and proj")
        return self


class SamLossConfig(Config):
    """MONAI DiceCELoss(sigmoid=True, squared_pred=True) on the low-res logits (paper A)."""

    dice_weight: float = 1.0
    """Weight of the Dice term."""
    ce_weight: float = 1.0
    """Weight of the (binary) cross-entropy term."""

    @model_validator(mode="after")
    def _check(self) -> "SamLossConfig":
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ValueError("dice_weight and ce_weight must be >= 0 and not both 0")
        return self


class SamTrainConfig(TrainStageConfig):
    """``sonosynth train-sam``: recipe fields below, engine/optim/tracking from the base."""

    task: ClassVar[str] = "sam"
    stage: ClassVar[str] = "train-sam"
    experiment: ClassVar[str] = "sonosynth-train-sam"
    registered_model: ClassVar[str] = "sonosynth-sam"
    resumable_changes: ClassVar[tuple[str, ...]] = TrainStageConfig.resumable_changes + ("data.cache_dir",)

    engine: EngineConfig = EngineConfig(**ENGINE_DEFAULTS)
    """Distributed training engine. Unless given: 20 epochs, micro-batch 5, and the checkpoint with
    the best val/dice is exported (engine.best_metric; null exports the last step)."""
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
    loss: SamLossConfig = SamLossConfig()
    """Loss weights."""

    @model_validator(mode="before")
    @classmethod
    def _engine_defaults(cls, data: Any) -> Any:
        """The SAM defaults fill what a recipe's engine section leaves out (best_metric, epochs)."""
        if isinstance(data, dict) and isinstance(data.get("engine"), dict):
            engine = dict(data["engine"])
            engine.setdefault("best_metric", ENGINE_DEFAULTS["best_metric"])
            if engine.get("max_steps") is None and engine.get("epochs") is None:
                engine["epochs"] = ENGINE_DEFAULTS["epochs"]
            data = {**data, "engine": engine}
        return data

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


# -- data ---------------------------------------------------------------------------------------

def resize_pair(image: np.ndarray, mask: np.ndarray, long_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8) and mask resized so the longest side is ``long_side`` (None: unchanged)."""
    if long_side is None or max(image.shape[:2]) == long_side:
        return image, mask
    size = preprocess_shape(*image.shape[:2], long_side)
    return resize_image(image, size), resize_mask(mask, size).numpy()


def mask_keys(uri: str, split: str | None, storage) -> list[str]:
    """Keys of the samples of ``split`` (None: all) that have a mask, from the manifest."""
    from sonosynth.datasets.manifest import read_manifest
    from sonosynth.infra.storage import open_storage

    t = read_manifest(open_storage(uri, storage)).to_pydict()
    return sorted(k for k, sp, m in zip(t["key"], t["split"], t["has_mask"]) if m and (split is None or sp == split))


def open_mix(parts: list[tuple[str, str | None, Any]], seed: int, storage, cache_dir) -> tuple[Dataset, list[dict]]:
    """``parts``: (dataset, split, wanted(available) -> count or None). The mixed map-style dataset
    and, per part, what was taken (for lineage)."""
    from sonosynth.datasets.indexed import ShardDataset, mix_indexed

    datasets, counts, taken = [], [], []
    for uri, split, wanted in parts:
        keys = mask_keys(uri, split, storage)
        count = wanted(len(keys))
        if count is not None and count > len(keys):
            raise ConfigError(f"{uri} has {len(keys)} samples with a mask in split {split!r}; {count} were asked "
                              f"for. Lower the count (null takes all).")
        ds = ShardDataset(uri, split=split, keys=keys, storage=storage, cache_dir=cache_dir)
        datasets.append(ds)
        counts.append(count)
        taken.append({"dataset": uri, "split": split, "available": len(keys),
                      "examples": len(keys) if count is None else count})
    mix = mix_indexed(datasets, counts=counts, seed=seed)
    keys = mix.keys()
    start = 0
    for part in taken:
        chosen = keys[start:start + part["examples"]]
        start += part["examples"]
        part["keys_sha256"] = hashlib.sha256("\n".join(chosen).encode()).hexdigest()
    return mix, taken


class SamExamples(Dataset):
    """SAM examples of a map-style image+mask dataset: {box [4], target [1, L, L]} plus the
    preprocessed ``image`` [3, S, S], or its cached ``embedding`` [C, g, g].

    Training examples (``fixed=False``) draw their augmentation and box jitter from the global
    numpy RNG, which the engine seeds per example; validation examples (``fixed=True``) get one
    fixed box per sample and no augmentation."""

    def __init__(self, source: Dataset, *, augment: PairedAugment, work_size: int | None, model_size: int,
                 low_res: int, jitter_px: int, seed: int, fixed: bool, embeddings: torch.Tensor | None = None):
        self.source, self.augment, self.work_size = source, augment, work_size
        self.model_size, self.low_res, self.jitter_px, self.seed = model_size, low_res, jitter_px, seed
        self.fixed = fixed
        self.embeddings = embeddings

    def __len__(self) -> int:
        return len(self.source)

    def raw(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
        """(key, uint8 image, 0/1 mask) at the working size, before augmentation."""
        item = self.source[i]
        image = item["image"][0].numpy()
        mask = (item["mask"][0].numpy() > 0).astype(np.uint8)
        image, mask = resize_pair(image, mask, self.work_size)
        return item["key"], image, mask

    def example(self, i: int, with_image: bool) -> dict[str, Any]:
        key, image, mask = self.raw(i)
        epoch = 0 if self.fixed else int(np.random.randint(2**31))  # the engine seeds it per example
        img, msk = self.augment(image, mask, epoch=epoch, index=key)
        box = box_from_mask(msk, self.jitter_px, np.random.default_rng(draw_seed("box", self.seed, epoch, key)))
        if box is None:  # an empty (augmented) mask: the whole image, an all-zero target
            box = full_box(msk.shape)
        out = {"box": torch.from_numpy(boxes_to_input(box[None], msk.shape, self.model_size)[0]),
               "target": logit_target(msk, self.model_size, self.low_res)}
        if with_image:
            out["image"] = sam_preprocess(img, self.model_size)[0]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        out = self.example(i, with_image=self.embeddings is None)
        if self.embeddings is not None:
            out["embedding"] = self.embeddings[i]
        return out

    def image(self, i: int) -> torch.Tensor:
        """The unaugmented preprocessed image of example ``i`` (what the cache embeds)."""
        _, image, _ = self.raw(i)
        return sam_preprocess(image, self.model_size)[0]


# -- the model ----------------------------------------------------------------------------------

def batch_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice [B] of the thresholded logits (MONAI ``compute_dice``; both empty: 1)."""
    from monai.metrics import compute_dice

    pred = (logits.float() > 0).float()
    return compute_dice(pred, target.float(), include_background=True, ignore_empty=False)[:, 0]


class SamTrainModule(torch.nn.Module):
    """What DeepSpeed wraps: SAM's prompt encoder and mask decoder, and the image encoder unless
    the embeddings are cached. Its state dict has ``Sam``'s key names."""

    def __init__(self, sam, *, with_encoder: bool, encoder_grad: bool, loss: SamLossConfig):
        from monai.losses import DiceCELoss

        super().__init__()
        self.image_encoder = sam.image_encoder if with_encoder else None
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.encoder_grad = encoder_grad
        self.loss = DiceCELoss(sigmoid=True, squared_pred=True, lambda_dice=loss.dice_weight,
                               lambda_ce=loss.ce_weight)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Low-res mask logits [B, 1, L, L]."""
        emb = batch.get("embedding")
        if emb is None:
            if self.image_encoder is None:
                raise ValueError("this module was built for cached embeddings and the batch has none")
            dtype = self.image_encoder.patch_embed.proj.weight.dtype
            emb = embed(self, batch["image"].to(dtype), grad=self.encoder_grad)
        return sam_forward(self, None, batch["box"], image_embeddings=emb)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        logits = self.logits(batch).float()
        target = batch["target"].float()
        loss = self.loss(logits, target)
        with torch.no_grad():
            dice = batch_dice(logits, target).mean()
        return loss, {"dice": dice}


def add_encoder_lora(image_encoder: torch.nn.Module, cfg: SamLoraConfig, seed: int) -> None:
    """peft LoRA adapters on the image encoder's attention, in place; only they train in it."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same adapters on every rank and every run
        inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                                           target_modules=list(cfg.target_modules)), image_encoder)
    for name, p in image_encoder.named_parameters():
        p.requires_grad_("lora_" in name)


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


# -- the task -----------------------------------------------------------------------------------

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

        sources = [(name, s) for name, s in d.sources.items() if s.count != 0]
        self.train_source, taken = open_mix([(s.dataset, s.split, s.wanted) for _, s in sources], d.seed,
                                            cfg.storage, d.cache_dir)
        self.sources = {name: part for (name, _), part in zip(sources, taken)}
        self.val_source, (self.val_part,) = open_mix([(d.val_dataset, d.val.split, d.val.wanted)], d.seed,
                                                     cfg.storage, d.cache_dir)
        common = dict(work_size=d.image_size, model_size=self.model_size, low_res=self.low_res,
                      jitter_px=d.augment.box_jitter_px, seed=cfg.engine.seed)
        self.train_examples = SamExamples(self.train_source, augment=PairedAugment(d.augment.preset, cfg.engine.seed),
                                          fixed=False, **common)
        self.val_examples = SamExamples(self.val_source, augment=PairedAugment("none"), fixed=True, **common)
        t0 = time.perf_counter()
        if cfg.cache_train:
            self.train_examples.embeddings = self._embed_all(self.train_examples)
        if cfg.cache_val and len(self.val_examples):
            self.val_examples.embeddings = self._embed_all(self.val_examples)
        self.cache_seconds = time.perf_counter() - t0
        self.encoder_needed = not cfg.cache_train  # (a cached training set implies a cached validation set)
        if not self.encoder_needed:
            sam.image_encoder.to("cpu")  # what the cache replaces leaves the device (ViT-B: ~350 MB)

    @torch.no_grad()
    def _embed_all(self, examples: SamExamples, chunk: int = 8) -> torch.Tensor:
        """Each rank embeds every world-th example; the shares are gathered on all ranks."""
        mine = list(range(self.ctx.rank, len(examples), self.ctx.world))
        encoded = {}
        encoder = self.sam.image_encoder
        was_training = encoder.training
        encoder.eval()
        try:
            for i in range(0, len(mine), chunk):
                part = mine[i:i + chunk]
                images = torch.stack([examples.image(j) for j in part]).to(self.ctx.device)
                for j, e in zip(part, embed(self.sam, images).float().cpu()):
                    encoded[j] = e
        finally:
            encoder.train(was_training)
        gathered: dict[int, torch.Tensor] = {}
        for share in self.ctx.all_gather(encoded):
            gathered.update(share)
        return torch.stack([gathered[j] for j in range(len(examples))])

    # -- engine interface -----------------------------------------------------------------
    def train_dataset(self) -> SamExamples:
        return self.train_examples

    def eval_dataset(self) -> SamExamples | None:
        if not len(self.val_examples):
            if self.cfg.engine.best_metric:
                d, e = self.cfg.data, self.cfg.engine
                raise ConfigError(f"the {d.val.split!r} split of {d.val_dataset} has no samples with a mask, and "
                                  f"engine.best_metric={e.best_metric} chooses the checkpoint on it; ingest with a "
                                  f"val split (splits.val > 0), point data.val.dataset at another dataset, or set "
                                  f"engine.best_metric=null to export the last step")
            return None
        return self.val_examples

    def module(self) -> SamTrainModule:
        return SamTrainModule(self.sam, with_encoder=self.encoder_needed, encoder_grad=not self.cfg.encoder_frozen,
                              loss=self.cfg.loss)

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
        tracker.log_params({f"data.examples.{name}": part["examples"] for name, part in self.sources.items()})

    def export(self, module: SamTrainModule, folder: Path, tracker) -> dict[str, Any]:
        cfg = self.cfg
        path = folder / WEIGHTS_FILE
        torch.save(finetuned_payload(module, cfg.mode), path)
        ckpt = cfg.model.checkpoint
        return {
            "format": FORMAT, "mode": cfg.mode, "base_model": cfg.model.identity(), "arch": cfg.model.arch,
            "base_checkpoint_sha256": sha256_file(ckpt) if ckpt and cfg.mode != "full" else None,
            "sources": self.sources, "val": self.val_part, "examples": len(self.train_examples),
            "val_examples": len(self.val_examples), "image_size": cfg.data.image_size,
            "model_input_size": self.model_size, "augment": cfg.data.augment.preset,
            "box_jitter_px": cfg.data.augment.box_jitter_px, "cached_embeddings": cfg.cache_train,
            "cache_seconds": round(self.cache_seconds, 3),
            "lora": cfg.lora.to_dict() if cfg.mode == "lora" else None,
            "weights_sha256": sha256_file(path),
        }
