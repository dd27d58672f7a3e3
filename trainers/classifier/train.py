"""The ``train-classifier`` stage: a fetal plane classifier on the shared training engine.

The data plan (``sources.plan_data``: real + synthetic sources mixed by count or ratio, one
label map, a real validation split) is computed from the manifests on every rank. Samples are
read map-style from the shards (``datasets.mix.open_mix``), turned into [3, S, S] by the
transforms of ``data.py`` (the train transform draws from the global RNG, which the engine
seeds per example, so a resumed job sees the same augmentation), and fed to a backbone of
``models.py``. A damaged shard stops the job naming it; with ``data.reader.on_error: skip`` its
samples are left out and counted (``data/skipped/<reason>``), labels following the samples read.

- loss: cross-entropy, optionally with label smoothing and inverse-frequency class weights
  (``loss``); ``forward`` also returns the batch accuracy (``train/acc``);
- evaluation: ``val/acc`` and ``val/loss`` (sum, count), and each class's TP, FP and FN,
  summed over every rank's share; from those ``finalize_metrics`` computes, per class,
  ``val/f1/<class>`` and ``val/recall/<class>``, and ``val/f1_macro`` (the mean F1 of the
  classes present in the split, as ``evaluation.classification`` and promotion compute it), so
  the figures are the whole validation split's and any of them can select the checkpoint
  (``engine.best_metric``, default ``val/acc``);
- BatchNorm: the engine broadcasts rank 0's running statistics after every optimizer step, so
  every rank evaluates the model rank 0 exports;
- export (rank 0): ``ImageClassifier.save_pretrained`` (weights, ``id2label``,
  ``preprocessor_config.json``) and ``classifier.json`` (backbone, labels, size, normalisation),
  what ``load_classifier`` reads back.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch.utils.data import Dataset

from sonosynth.datasets.mix import open_mix
from sonosynth.datasets.reader import add_skipped
from sonosynth.datasets.tario import OnError
from sonosynth.infra.config import Config, ConfigError
from sonosynth.infra.seeds import derive_seed
from sonosynth.trainers.classifier.data import ClassifierAugmentConfig, build_transforms, grayscale_stats
from sonosynth.trainers.classifier.models import ClassifierModelConfig, ImageClassifier, build_classifier
from sonosynth.trainers.classifier.sources import ClassifierDataConfig, DataPlan, Part, plan_data
from sonosynth.trainers.config import TrainStageConfig
from sonosynth.trainers.task import TrainTask, WorkerContext
from sonosynth.trainers.tasks import register_task

CLASSIFIER_FILE = "classifier.json"
"""What a classifier model folder holds besides the backbone's own files."""
FORMAT = 1
COUNTS = "val/counts/"
"""Prefix of the per-class TP, FP and FN ``eval_step`` sums and ``finalize_metrics`` turns into F1s."""


class ClassifierLossConfig(Config):
    """The training loss: cross-entropy."""

    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (0: none; FU-LoRA: none)."""
    class_weights: bool = False
    """Weight each class by N / (K * n_class) of the training mix (inverse frequency), so rare
    classes count as much as common ones; the reported val/loss stays unweighted."""

    @model_validator(mode="after")
    def _check(self) -> "ClassifierLossConfig":
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("loss.label_smoothing must be in [0, 1), e.g. 0.1")
        return self


class ClassifierTrainConfig(TrainStageConfig):
    """``sonosynth train-classifier``: data, model, augmentation and loss; engine/optim/tracking from the base."""

    task: ClassVar[str] = "classifier"
    stage: ClassVar[str] = "train-classifier"
    experiment: ClassVar[str] = "sonosynth-train-classifier"
    registered_model: ClassVar[str] = "sonosynth-classifier"
    resumable_changes: ClassVar[tuple[str, ...]] = TrainStageConfig.resumable_changes + ("data.cache_dir",
                                                                                        "data.reader")
    engine_defaults: ClassVar[dict[str, Any]] = {"epochs": 20, "micro_batch": 12, "best_metric": "val/acc",
                                                 "best_mode": "max", "checkpoint_every": 200, "loader_workers": 2}
    """FU-LoRA's 20 epochs at global batch 24 (micro-batch 12 on 2 workers), 2 loader workers per
    rank, the checkpoint with the best val/acc exported (engine.best_metric; null exports the last step)."""

    data: ClassifierDataConfig
    """Training sources (mixed by count or ratio), labels and the validation split."""
    model: ClassifierModelConfig = ClassifierModelConfig()
    """Backbone, weights and input size (FU-LoRA: 224 px, ImageNet weights)."""
    augment: ClassifierAugmentConfig = ClassifierAugmentConfig()
    """Training augmentation (preset paper: FU-LoRA's; none: the eval transform)."""
    loss: ClassifierLossConfig = ClassifierLossConfig()
    """Cross-entropy options."""


class ClassifierItems(Dataset):
    """Samples of a data plan's parts -> {pixel_values [3,S,S], label, index}; ``labels`` has one
    label per key of ``parts``. With ``on_error`` skip, samples of damaged shards are left out (and
    counted in ``skipped``) and a sample that does not decode comes back as the next readable one of
    its dataset, with that one's label."""

    def __init__(self, parts: list[Part], labels: list[int], transform, cache_dir: str | None, storage,
                 on_error: OnError = "raise"):
        self.mix = open_mix(parts, storage, cache_dir, on_error=on_error)
        given = iter(labels)
        self._label = {(ds.uri, k): next(given) for p, (ds, _) in zip(parts, self.mix.parts) for k in p.keys}
        self.labels = [self._label[ds.uri, ds.key(int(j))] for ds, chosen in self.mix.parts for j in chosen]
        self.transform = transform

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} of what ``on_error: skip`` left out."""
        return self.mix.skipped

    def __len__(self) -> int:
        return len(self.mix)

    def image(self, i: int) -> np.ndarray:
        return self.mix[i]["image"]

    def __getitem__(self, i: int) -> dict[str, Any]:
        ds, j = self.mix.locate(i)
        item = ds[j]  # under on_error: skip, a sample that does not decode is replaced by a readable one
        # index=None: the augmentation draws from the global RNG, seeded by the engine per example.
        return {"pixel_values": self.transform(item["image"], index=None), "label": self._label[ds.uri, item["key"]],
                "index": i}


def pixel_stats(items: ClassifierItems, n: int, seed: int) -> tuple[float, float]:
    """(mean, std) of [0, 1] pixels of ``n`` training images (a seeded choice)."""
    chosen = sorted(random.Random(derive_seed("classifier-stats", seed)).sample(range(len(items)),
                                                                                 min(n, len(items))))
    return grayscale_stats(items.image(i) for i in chosen)


class ClassifierModule(torch.nn.Module):
    """What DeepSpeed wraps: ``forward(batch, generator) -> (cross-entropy, {"acc": ...})``."""

    def __init__(self, net: ImageClassifier, class_weights: torch.Tensor | None, label_smoothing: float):
        super().__init__()
        self.net = net
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        return self.net(pixel_values.to(dtype)).float()

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        logits = self.logits(batch["pixel_values"])
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        loss = F.cross_entropy(logits, batch["label"], weight=weight, label_smoothing=self.label_smoothing)
        return loss, {"acc": (logits.argmax(1) == batch["label"]).float().mean()}


def class_weights(labels: list[int], k: int) -> torch.Tensor:
    """N / (K_present * n_c) per class (0 for a class with no sample)."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=k).double()
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, counts.sum() / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


def f1_by_class(reduced: dict[str, float], classes: list[str]) -> dict[str, float]:
    """``val/f1/<c>`` and ``val/recall/<c>`` of the classes where they are defined, and
    ``val/f1_macro``, the mean F1 of the classes present (TP + FN > 0), from summed TP, FP, FN."""
    out, present = {}, []
    for c in classes:
        tp, fp, fn = (reduced.get(f"{COUNTS}{c}/{x}", 0.0) for x in ("tp", "fp", "fn"))
        if 2 * tp + fp + fn > 0:
            out[f"val/f1/{c}"] = 2 * tp / (2 * tp + fp + fn)
        if tp + fn > 0:
            out[f"val/recall/{c}"] = tp / (tp + fn)
            present.append(out[f"val/f1/{c}"])
    if present:
        out["val/f1_macro"] = sum(present) / len(present)
    return out

@register_task("classifier")
class ClassifierTask(TrainTask):
    def __init__(self, cfg: ClassifierTrainConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        self.plan: DataPlan = plan_data(cfg.data, cfg.storage)
        self.classes = list(self.plan.labels.classes)
        if cfg.model.num_labels is not None and cfg.model.num_labels != len(self.classes):
            raise ConfigError(f"model.num_labels={cfg.model.num_labels} but the job's label map has "
                              f"{len(self.classes)} classes {self.classes}; set model.num_labels to null")
        d = cfg.data
        self.train_items = ClassifierItems(self.plan.train, self.plan.train_labels(), None, d.cache_dir, cfg.storage,
                                           d.reader.on_error)
        self.train_labels = self.train_items.labels
        model_cfg = cfg.model
        self.stats = None
        if model_cfg.pixel_mean is None and not model_cfg.pretrained and d.stats_images:
            self.stats = pixel_stats(self.train_items, d.stats_images, d.seed)
            model_cfg = model_cfg.model_copy(update={"pixel_mean": [self.stats[0]], "pixel_std": [self.stats[1]]})
        self.model_cfg = model_cfg
        self.net = build_classifier(model_cfg, self.classes)  # seeded by model.seed: the same on every rank
        train_tf, eval_tf = build_transforms(model_cfg.image_size, self.net.pixel_mean, self.net.pixel_std,
                                             cfg.augment, cfg.engine.seed)
        self.train_items.transform, self.eval_transform = train_tf, eval_tf
        val_labels = [self.plan.labels.index(p.planes[k], k) for p in self.plan.val for k in p.keys]
        self.val_items = ClassifierItems(self.plan.val, val_labels, eval_tf, d.cache_dir, cfg.storage,
                                         d.reader.on_error)

    def train_dataset(self) -> ClassifierItems:
        return self.train_items

    def eval_dataset(self) -> ClassifierItems:
        return self.val_items

    def module(self) -> ClassifierModule:
        weights = class_weights(self.train_labels, len(self.classes)) if self.cfg.loss.class_weights else None
        return ClassifierModule(self.net, weights, self.cfg.loss.label_smoothing)

    def data_skipped(self) -> dict[str, int]:
        return add_skipped([self.train_items.skipped, self.val_items.skipped])

    def eval_step(self, module: ClassifierModule, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        logits = module.logits(batch["pixel_values"])
        y = batch["label"]
        pred = logits.argmax(1)
        n = len(y)
        out: dict[str, Any] = {"val/acc": ((pred == y).sum(), n),
                               "val/loss": (F.cross_entropy(logits, y, reduction="sum"), n)}
        for c, name in enumerate(self.classes):
            out[f"{COUNTS}{name}/tp"] = ((pred == c) & (y == c)).sum()
            out[f"{COUNTS}{name}/fp"] = ((pred == c) & (y != c)).sum()
            out[f"{COUNTS}{name}/fn"] = ((pred != c) & (y == c)).sum()
        return out

    def finalize_metrics(self, reduced: dict[str, float]) -> dict[str, float]:
        kept = {k: v for k, v in reduced.items() if not k.startswith(COUNTS)}
        return {**kept, **f1_by_class(reduced, self.classes)}

    def on_start(self, tracker) -> None:
        from sonosynth.datasets.preview import tile_images

        tracker.log_text(json.dumps(self.data_lineage(), indent=1), "data.json")
        t = self.train_items.transform
        mean, std = torch.tensor(self.net.pixel_mean).view(3, 1, 1), torch.tensor(self.net.pixel_std).view(3, 1, 1)
        picks = list(range(0, len(self.train_items), max(1, len(self.train_items) // 16)))[:16]
        tiles = []
        for i in picks:
            x = t(self.train_items.image(i), index=i) * std + mean  # its own seed: the global RNG is left alone
            tiles.append((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        tracker.log_image(tile_images(tiles, cols=8), "inputs.png")

    def data_lineage(self) -> dict[str, Any]:
        return {**self.plan.lineage(), "train_samples": len(self.train_items), "val_samples": len(self.val_items),
                "pixel_stats_from_data": list(self.stats) if self.stats else None}

    def export(self, module: ClassifierModule, folder: Path, tracker) -> dict[str, Any]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        net = copy.deepcopy(module.net).float().cpu()
        net.save_pretrained(folder)
        info = {"format": FORMAT, "backbone": net.backbone, "labels": self.classes, "image_size": net.image_size,
                "pixel_mean": list(net.pixel_mean), "pixel_std": list(net.pixel_std)}
        (folder / CLASSIFIER_FILE).write_text(json.dumps(info, indent=1))
        return {"classifier": info, "base_model": self.cfg.model.identity(), "data": self.data_lineage(),
                "augment": self.cfg.augment.to_dict(), "loss": self.cfg.loss.to_dict()}
