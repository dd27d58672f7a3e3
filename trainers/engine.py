"""The distributed training engine shared by the LoRA, SAM and classifier recipes.

``train(cfg)`` runs on the driver: it checks the output folder, joins Ray, and starts a
Ray Train ``TorchTrainer`` with N workers. Each worker builds the recipe's ``TrainTask``,
wraps its module with ``deepspeed.initialize`` on the process group Ray made (ZeRO stage
from config), restores the last complete checkpoint if there is one, and runs
``worker.run_steps``. The data order is a pure function of (seed, step), so a resumed job
sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from sonosynth.infra.cluster import RayConfig
from sonosynth.infra.config import Config
from sonosynth.infra.storage import StorageConfig
from sonosynth.infra.tracking import TrackingConfig
from sonosynth.trainers.optim import OptimConfig


class EngineConfig(Config):
    """Workers, precision, ZeRO, batch, step count, checkpoints and logging of a training job."""

    workers: int = 2
    """Ray Train workers (ranks): one per GPU on a GPU cluster, or CPU processes."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """'auto' trains on GPUs when the Ray cluster has them, else on CPU (gloo)."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker (also its torch thread count on CPU)."""
    zero_stage: Literal[0, 1, 2] = 2
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU."""
    micro_batch: int = 1
    """Examples per worker per forward pass (both papers: 1)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; global batch = workers x micro_batch x this."""
    max_steps: int | None = None
    """Optimizer steps to train for (give this or epochs)."""
    epochs: float | None = None
    """Passes over the training examples; converted to steps (paper A: 100 over 24 images)."""
    seed: int = 0
    """Seed of the data order, the noise and the timesteps (FU-LoRA: 1234)."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    log_every: int = 10
    """Log training metrics every this many steps."""
    max_failures: int = 1
    """Worker-group restarts Ray Train makes after a failure (each resumes from the last checkpoint)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of engine.max_steps or engine.epochs")
        for name in ("workers", "cpus_per_worker", "micro_batch", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("engine.max_steps must be at least 1")
        return self

    def global_batch(self) -> int:
        return self.workers * self.micro_batch * self.grad_accum

    def total_steps(self, num_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * num_examples / self.global_batch()))


class TrainStageConfig(Config):
    """What every training stage has: output, engine, optimizer, tracking, cluster."""

    task_class: ClassVar[str] = ""
    """Import path of the stage's ``TrainTask`` (module:Class)."""
    experiment: ClassVar[str] = "sonosynth"
    registered_model: ClassVar[str] = ""
    resumable_changes: ClassVar[tuple[str, ...]] = (
        "engine.max_steps", "engine.epochs", "engine.max_failures", "engine.progress",
        "engine.checkpoint_every", "engine.keep_checkpoints", "engine.log_every",
        "tracking.", "ray.", "storage.", "out",
    )
    """Fields a resumed job may change; any other difference means a different job."""

    out: str
    """Output folder or s3:// prefix: checkpoints, the exported model, config.yaml, summary.json."""
    engine: EngineConfig = EngineConfig(max_steps=100)
    """Distributed training engine."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and schedule."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking and registration."""
    ray: RayConfig = RayConfig()
    """Ray cluster to run on."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the output storage."""

    def job_identity(self) -> dict[str, Any]:
        """The flattened config minus the fields a resumed job may change."""
        return {k: v for k, v in self.flat().items()
                if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in self.resumable_changes)}


def ds_config(engine: EngineConfig, optim: OptimConfig, world: int, on_gpu: bool, bf16_ok: bool) -> dict:
    precision = engine.precision
    if precision == "auto":
        precision = ("bf16" if bf16_ok else "fp16") if on_gpu else "fp32"
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": engine.micro_batch,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": engine.micro_batch * engine.grad_accum * world,
        "zero_optimization": {"stage": engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
    }
    if optim.grad_clip:
        cfg["gradient_clipping"] = optim.grad_clip
    return cfg


def check_output(storage, cfg: TrainStageConfig) -> bool:
    """Refuse to resume a different job into ``out``; write config.yaml. True when resuming."""
    import yaml

    from sonosynth.infra.config import ConfigError, flatten

    if storage.exists("config.yaml"):
        old = flatten(yaml.safe_load(storage.get_text("config.yaml")) or {})
        new = cfg.job_identity()
        old = {k: v for k, v in old.items() if k in new or k not in cfg.flat()}
        changed = sorted(k for k in set(old) | set(new) if _norm(old.get(k)) != _norm(new.get(k)))
        if changed:
            raise ConfigError(
                f"{storage.url('')} holds a job with a different config ({', '.join(changed[:6])}"
                f"{' ...' if len(changed) > 6 else ''} differ); write to a new --set out=..., or delete "
                f"that folder to start over")
        resuming = True
    else:
        resuming = False
    storage.put_text("config.yaml", cfg.to_yaml())
    return resuming


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def train(cfg: TrainStageConfig) -> dict[str, Any]:
    """Run (or resume) the training job described by ``cfg``; returns its summary.json."""
    import json

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from sonosynth.infra.cluster import cluster_gpus, connect
    from sonosynth.infra.storage import open_storage
    from sonosynth.trainers.worker import SUMMARY, job_fingerprint, train_worker

    storage = open_storage(cfg.out, cfg.storage)
    check_output(storage, cfg)
    if storage.exists(SUMMARY):
        summary = json.loads(storage.get_text(SUMMARY))
        if summary.get("job") == job_fingerprint(cfg):
            return {**summary, "already_complete": True}
    connect(cfg.ray)
    gpus = cluster_gpus()
    if cfg.engine.device == "gpu" and gpus < cfg.engine.workers:
        raise RuntimeError(f"engine.device=gpu needs {cfg.engine.workers} GPUs and the Ray cluster has "
                           f"{gpus}; lower engine.workers or use engine.device=auto")
    use_gpu = cfg.engine.device == "gpu" or (cfg.engine.device == "auto" and gpus >= cfg.engine.workers)
    resources = {"CPU": cfg.engine.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config_class": f"{type(cfg).__module__}:{type(cfg).__name__}",
                           "config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.engine.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{cfg.experiment}-{hashlib.sha1(cfg.out.encode()).hexdigest()[:10]}",
            failure_config=ray.train.FailureConfig(max_failures=cfg.engine.max_failures)),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainingError(f"training failed: {err}") from err
    return json.loads(storage.get_text(SUMMARY))


class TrainingError(RuntimeError):
    """The training job failed after its retries; the message carries the worker's error."""
