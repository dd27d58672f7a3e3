"""Configuration of every training job: the engine, the stage base class, DeepSpeed's config.

``EngineConfig`` is the distributed loop (workers, precision, batch, steps, data loading,
evaluation, checkpoints); ``TrainStageConfig`` is what every training stage has (output,
engine, optimizer, tracking, cluster) plus the name of its task, checked against the task
registry when the config is built.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from sonosynth.infra.cluster import RayConfig
from sonosynth.infra.config import OPERATIONAL_FIELDS, Config, is_under
from sonosynth.infra.jobdir import fingerprint
from sonosynth.infra.storage import StorageConfig
from sonosynth.infra.tracking import TrackingConfig
from sonosynth.trainers.optim import OptimConfig
from sonosynth.trainers.tasks import registered_tasks, unknown_task_message


class EngineConfig(Config):
    """Workers, precision, ZeRO, batch, steps, data loading, evaluation, checkpoints and logging."""

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
    """Examples per worker per forward pass (both papers: 1); also the evaluation batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; global batch = workers x micro_batch x this."""
    max_steps: int | None = None
    """Optimizer steps to train for (give this or epochs)."""
    epochs: float | None = None
    """Passes over the training examples; converted to steps (paper A: 100 over 24 images)."""
    seed: int = 0
    """Seed of the data order, the augmentation, the noise and the timesteps (FU-LoRA: 1234)."""
    loader_workers: int = 0
    """DataLoader worker processes per rank (0: load on the training process). 0 suits tasks whose
    examples are cached tensors (the LoRA); 2-8 per GPU for tasks that decode and augment images."""
    prefetch: int = 2
    """Batches each loader worker prepares ahead (used when loader_workers > 0)."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    eval_every: int | None = None
    """Evaluate on the task's validation set every this many steps (and at the start and the end);
    null: at every checkpoint."""
    best_metric: str | None = None
    """Export the evaluation with the best value of this metric (e.g. val/dice) as the job's model,
    instead of the last step; null exports the last step."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger (max, e.g. val/dice) or a smaller (min, e.g. val/loss) best_metric is better."""
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
        for name in ("workers", "cpus_per_worker", "micro_batch", "grad_accum", "checkpoint_every", "log_every",
                     "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("engine.max_steps must be at least 1")
        if self.loader_workers < 0:
            raise ValueError("engine.loader_workers must be 0 (load on the training process) or more")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError("engine.eval_every must be at least 1, or null to evaluate at checkpoints")
        if self.best_metric is not None and not self.best_metric.strip():
            raise ValueError("engine.best_metric is empty; name an evaluation metric (e.g. val/dice) or use null")
        return self

    def global_batch(self) -> int:
        return self.workers * self.micro_batch * self.grad_accum

    def total_steps(self, num_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * num_examples / self.global_batch()))

    def evaluates_at(self, done: int, total: int) -> bool:
        """Whether the engine evaluates after ``done`` steps (besides before the first)."""
        return done == total or done % (self.eval_every or self.checkpoint_every) == 0


LENGTH_FIELDS = ("max_steps", "epochs")
"""The engine fields that say how long a job trains: a recipe gives one of them, or neither."""


def with_engine_defaults(defaults: dict[str, Any], given: Any) -> Any:
    """The engine section ``given`` (a mapping, an EngineConfig or None) with ``defaults`` under it:
    every field it leaves out comes from ``defaults``, and the length (``LENGTH_FIELDS``) comes from the
    defaults only when it gives neither max_steps nor epochs."""
    if isinstance(given, EngineConfig):
        given = {name: getattr(given, name) for name in given.model_fields_set}
    if given is None:
        given = {}
    if not isinstance(given, dict):
        return given  # not a section: validation names it
    length = {k: v for k, v in given.items() if k in LENGTH_FIELDS and v is not None}
    if not length:
        length = {k: v for k, v in defaults.items() if k in LENGTH_FIELDS}
    rest = {k: v for k, v in given.items() if k not in LENGTH_FIELDS}
    return {**{k: v for k, v in defaults.items() if k not in LENGTH_FIELDS}, **rest, **length}


class TrainStageConfig(Config):
    """What every training stage has: output, engine, optimizer, tracking, cluster."""

    task: ClassVar[str] = ""
    """Registered name of the stage's ``TrainTask`` (``sonosynth.trainers.tasks``)."""
    stage: ClassVar[str] = ""
    """The stage's name, e.g. train-lora (default: train-<task>)."""
    experiment: ClassVar[str] = "sonosynth"
    registered_model: ClassVar[str] = ""
    resumable_changes: ClassVar[tuple[str, ...]] = OPERATIONAL_FIELDS + (
        "engine.max_steps", "engine.epochs", "engine.max_failures", "engine.checkpoint_every",
        "engine.keep_checkpoints", "engine.log_every",
    )
    """Fields a resumed job may change (the operational ones, and how long it trains); any other
    difference means a different job."""
    engine_defaults: ClassVar[dict[str, Any]] = {"max_steps": 100}
    """The stage's engine settings wherever the recipe's engine section and --set give none."""

    out: str
    """Output folder or s3:// prefix: checkpoints, the exported model, config.yaml, summary.json."""
    engine: EngineConfig = EngineConfig(max_steps=100)
    """Distributed training engine; what it leaves out comes from the stage's ``engine_defaults``."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and schedule."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking and registration."""
    ray: RayConfig = RayConfig()
    """Ray cluster to run on."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the output storage."""

    @model_validator(mode="before")
    @classmethod
    def _engine_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {**data, "engine": with_engine_defaults(cls.engine_defaults, data.get("engine"))}
        return data

    @model_validator(mode="after")
    def _check_task(self) -> "TrainStageConfig":
        if not type(self).task:
            raise ValueError(f"{type(self).__name__} names no task: give it `task: ClassVar[str] = \"<name>\"` "
                             f"(registered: {', '.join(registered_tasks()) or 'none'})")
        if type(self).task not in registered_tasks():
            raise ValueError(unknown_task_message(type(self).task))
        return self

    @classmethod
    def stage_name(cls) -> str:
        return cls.stage or f"train-{cls.task}"

    def job_identity(self) -> dict[str, Any]:
        """The flattened config minus the fields a resumed job may change."""
        return {k: v for k, v in self.flat().items() if not is_under(k, self.resumable_changes)}


def job_fingerprint(cfg: TrainStageConfig) -> str:
    """Identifies a finished job: its identity plus how long it trains."""
    return fingerprint({**cfg.job_identity(), "engine.max_steps": cfg.engine.max_steps,
                        "engine.epochs": cfg.engine.epochs})


def ds_config(engine: EngineConfig, optim: OptimConfig, world: int, on_gpu: bool, bf16_ok: bool) -> dict:
    """DeepSpeed's config for this engine on ``world`` ranks."""
    from sonosynth.trainers.precision import choose_precision

    precision = choose_precision(engine.precision, on_gpu, bf16_ok)
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
