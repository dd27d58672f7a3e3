"""Optimizer and learning-rate schedule, shared by every recipe."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import model_validator

from sonosynth.infra.config import Config


class OptimConfig(Config):
    """AdamW with per-group learning rates and a warmup + decay schedule."""

    lr: float = 1e-4
    """Peak learning rate of the main parameter group (paper A and FU-LoRA UNet: 1e-4)."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay (paper A: 1e-2)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (null: no clipping)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warmup (both papers: constant)."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine and linear decay end at lr * min_lr_ratio."""

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.lr <= 0:
            raise ValueError("lr must be positive, e.g. 1e-4")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        return self


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of each group's lr at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_optimizer(groups: list[dict], cfg: OptimConfig, total_steps: int):
    """(AdamW, LambdaLR); a group may carry its own ``lr``, the rest use ``cfg.lr``."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: the recipe froze everything")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
    return optimizer, scheduler
