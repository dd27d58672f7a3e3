"""The ``generate`` stage: many sampler actors, one synthetic dataset, every sample once.

The job is planned as shard-sized tasks with fixed sample indices; sample ``i``'s attempt
``a`` has a seed derived from (seed, i, a) and the key ``syn-<run id>-<i>``, where the run
id is a hash of everything that shapes the images. A task samples its indices (rejected
ones are retried with the next attempt's seed, up to ``max_attempts``), publishes its shard
atomically and then its completion record. Re-running the same command skips shards with a
matching record, so a crash or a kill costs only the shards in flight, and a retried task
rewrites the same shard under the same name: no duplicates, no gaps.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import model_validator

from sonosynth.datasets.labels import PLANES
from sonosynth.datasets.synthetic import QCConfig
from sonosynth.infra.cluster import RayConfig
from sonosynth.infra.config import Config
from sonosynth.infra.storage import StorageConfig
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.tracking import TrackingConfig
from sonosynth.trainers.diffusion.data import PAPER_A_PROMPT
from sonosynth.trainers.diffusion.sampler import SamplerConfig, SampleSpec

log = logging.getLogger(__name__)


class GenerateConfig(Config):
    """``sonosynth generate``: how many samples, from which model, on how many workers."""

    out: str
    """Destination dataset: a folder or s3://bucket/prefix."""
    num_samples: int = 64
    """Accepted samples to deliver."""
    sampler: SamplerConfig = SamplerConfig()
    """Base model, LoRA and sampling settings."""
    qc: QCConfig = QCConfig()
    """Mask extraction and quality filter (joint mode)."""
    mode: Literal["joint", "class"] | None = None
    """'joint' (image+mask) or 'class' (one plane per prompt); null: the LoRA's training mode."""
    prompt: str | None = None
    """Joint mode prompt (null: the one the LoRA was trained with)."""
    planes: list[str] | None = None
    """Class mode: planes to draw, in turn by sample index (null: all the LoRA was trained on). The
    order is part of the run id: it decides which plane each index gets."""
    per_class: int | None = None
    """Class mode: samples per plane; num_samples becomes per_class x the number of planes (giving
    both is an error unless they agree)."""
    plane: str | None = None
    """Joint mode: plane label written to meta.json (e.g. 'brain' for fetal heads)."""
    shard_size: int = 64
    """Samples per shard, and per task."""
    workers: int | None = None
    """Sampler actors (null: one per GPU of the cluster, else one per cpus_per_worker CPUs)."""
    cpus_per_worker: int = 1
    """CPUs reserved per actor (its torch threads on CPU)."""
    max_attempts: int = 4
    """Attempts per sample index before it is given up (each with a new derived seed)."""
    seed: int = 0
    """Root seed; sample i, attempt a uses a seed derived from (seed, i, a)."""
    max_task_losses: int = 5
    """Times one shard task may be lost with its actor or node and drawn again (tasks are
    idempotent) before the job stops; an error raised by the task itself is never retried."""
    replacement_wait_s: float = 600.0
    """Seconds the job waits for at least one sampler actor to be ready (at start, and after
    losing actors) before it stops naming the cluster's free resources."""
    ray: RayConfig = RayConfig()
    """Ray cluster to run on."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking of the job."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the destination storage."""
    progress: bool = True
    """Show a progress bar (samples, acceptance, samples/s)."""

    @model_validator(mode="before")
    @classmethod
    def _per_class(cls, data: Any) -> Any:
        """With per_class and explicit planes, num_samples follows (checked when both are given)."""
        if not isinstance(data, dict) or data.get("per_class") is None or not data.get("planes"):
            return data
        if data.get("mode") == "joint":
            return data  # refused by _check
        n = data["per_class"] * len(data["planes"]) if isinstance(data["per_class"], int) else None
        if n is None:
            return data
        given = data.get("num_samples")
        if given is not None and given != n:
            raise ValueError(per_class_mismatch(given, data["per_class"], len(data["planes"])))
        return {**data, "num_samples": n}

    @model_validator(mode="after")
    def _check(self) -> "GenerateConfig":
        if self.per_class is not None:
            if self.per_class < 1:
                raise ValueError("per_class must be at least 1 (or null: num_samples in all)")
            if self.mode == "joint":
                raise ValueError("per_class is for class mode (mode: class); joint mode takes num_samples")
        if self.planes is not None:
            twice = sorted({p for p in self.planes if self.planes.count(p) > 1})
            if twice:
                raise ValueError(f"planes lists {twice} more than once; list each plane once (the order sets "
                                 f"which plane each sample index gets)")
            if not self.planes:
                raise ValueError("planes is empty; list the planes to draw, or null for all the LoRA knows")
        for name in ("num_samples", "shard_size", "max_attempts", "cpus_per_worker", "replacement_wait_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be at least 1 (or null for one per GPU)")
        bad = sorted(set(self.planes or []) - set(PLANES))
        if bad:
            raise ValueError(f"unknown planes {bad}; planes are {list(PLANES)}")
        return self


def per_class_mismatch(num_samples: int, per_class: int, planes: int) -> str:
    return (f"num_samples={num_samples} but per_class={per_class} x {planes} planes = {per_class * planes}; "
            f"give one of them (per_class sets num_samples in class mode)")


def sample_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of sample ``index``'s attempt ``attempt``."""
    return derive_seed("generate", seed, index, attempt)


@dataclass
class JobPlan:
    """Everything a worker needs besides the config: identical on every worker."""

    run_id: str
    mode: str
    prompts: dict[str, str]
    """plane (or '' in joint mode) -> prompt."""
    planes: list[str]
    lineage: dict[str, Any]
    tasks: list[dict[str, Any]] = field(default_factory=list)

    def spec(self, cfg: GenerateConfig, index: int, attempt: int) -> SampleSpec:
        plane = self.planes[index % len(self.planes)] if self.mode == "class" else cfg.plane
        prompt = self.prompts[plane if self.mode == "class" else ""]
        return SampleSpec(index, attempt, sample_seed(cfg.seed, index, attempt), prompt, plane)


def plan_job(cfg: GenerateConfig, lineage: dict[str, Any], lora_sha: str | None) -> JobPlan:
    mode = cfg.mode or lineage.get("mode") or "joint"
    if mode == "class":
        known = lineage.get("class_prompts") or {}
        planes = cfg.planes or sorted(known)
        if not planes:
            raise ValueError("class mode needs planes: set planes: [brain, femur, ...] or use a LoRA "
                             "trained in class mode (its lineage.json lists its planes)")
        from sonosynth.trainers.diffusion.data import FU_LORA_PROMPTS

        missing = [p for p in planes if p not in known and p not in FU_LORA_PROMPTS]
        if missing:
            raise ValueError(f"no prompt for planes {missing}; the LoRA knows {sorted(known)}")
        prompts = {p: known.get(p) or FU_LORA_PROMPTS[p] for p in planes}
        if cfg.per_class is not None:
            n = cfg.per_class * len(planes)
            if "num_samples" in cfg.model_fields_set and cfg.num_samples != n:
                raise ValueError(per_class_mismatch(cfg.num_samples, cfg.per_class, len(planes)))
            cfg.num_samples = n  # the planes came from the LoRA: the count is known only now
        elif cfg.num_samples % len(planes):
            counts = {p: len(range(i, cfg.num_samples, len(planes))) for i, p in enumerate(planes)}
            log.warning("num_samples=%d does not divide among %d planes: %s; set per_class for even classes",
                        cfg.num_samples, len(planes), counts)
    else:
        if cfg.per_class is not None:
            raise ValueError("per_class is for class mode; this LoRA was trained in joint mode (set num_samples)")
        planes = []
        trained = lineage.get("prompts") or [PAPER_A_PROMPT]
        prompts = {"": cfg.prompt or trained[0]}
    # The LoRA counts by content (its sha256), not by where it was read from. In class mode the
    # ordered planes decide each index's plane (the prompts dict is hashed with sorted keys).
    identity = {"sampler": cfg.sampler.model_dump(mode="json", exclude={"batch_size", "compile", "lora"}),
                "lora_sha256": lora_sha, "qc": cfg.qc.to_dict(), "mode": mode, "prompts": prompts,
                "seed": cfg.seed, "max_attempts": cfg.max_attempts}
    if mode == "class":
        identity["planes"] = list(planes)
    else:
        identity["plane"] = cfg.plane
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    plan = JobPlan(run_id, mode, prompts, planes, lineage)
    for start in range(0, cfg.num_samples, cfg.shard_size):
        indices = list(range(start, min(cfg.num_samples, start + cfg.shard_size)))
        task_plan = hashlib.sha256(json.dumps({"run": run_id, "indices": indices, "shard_size": cfg.shard_size},
                                              sort_keys=True).encode()).hexdigest()
        plan.tasks.append({"shard_index": start // cfg.shard_size, "indices": indices, "plan": task_plan})
    return plan
