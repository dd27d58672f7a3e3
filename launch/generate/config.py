"""The ``generate`` stage: many sampler actors, one synthetic dataset, every sample once.

Modes: ``joint`` (image+mask drawn together, the mask extracted), ``class`` (plane images) and
``mask`` (a ControlNet draws an image for each given conditioning mask, which becomes the
sample's mask exactly; sample ``i``'s mask at attempt ``a`` comes from the seed
``mask_seed(seed, i, a)``: drawn from a head-shape model or a real mask, geometrically augmented).

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
from sonosynth.datasets.shape_model import MaskAugmentConfig, ShapeModelConfig
from sonosynth.datasets.synthetic import FIDELITY_QC, MASK_MODE_QC, QCConfig
from sonosynth.infra.cluster import RayConfig
from sonosynth.infra.config import Config
from sonosynth.infra.storage import StorageConfig
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.tracking import TrackingConfig
from sonosynth.trainers.diffusion.data import PAPER_A_PROMPT
from sonosynth.trainers.diffusion.sampler import SamplerConfig, SampleSpec

log = logging.getLogger(__name__)
LORA_MODES = ("joint", "class")
"""Modes that draw with the LoRA alone (no ControlNet)."""


class MaskSourceConfig(Config):
    """Mask mode: where each sample's conditioning mask comes from."""

    source: Literal["shape_model", "real"] = "shape_model"
    """'shape_model': a head ellipse drawn from a fitted head-shape model; 'real': a real mask of
    ``dataset``, geometrically augmented (flips, rotation, scale, shift)."""
    shape_model: str | None = None
    """A saved shape_model.json (local path or s3:// URI); null: fitted on ``dataset`` when the job is
    planned and saved to OUT/shape_model.json."""
    dataset: str | None = None
    """Real image+mask dataset (from ``sonosynth ingest``): the masks the shape model is fitted on, or
    the masks drawn (source real)."""
    split: str | None = "train"
    """Use only this split of ``dataset`` (null: every sample)."""
    frame: Literal["pad", "stretch"] | None = None
    """How a non-square mask becomes the square the ControlNet draws at: 'pad' (centred, aspect kept)
    or 'stretch'; null: the ControlNet's training resize (its lineage.json), else pad."""
    shape: ShapeModelConfig = ShapeModelConfig()
    """How the shape model is fitted and where its heads may lie (a saved model keeps its own)."""
    augment: MaskAugmentConfig = MaskAugmentConfig()
    """Source real: the geometric augmentation of each drawn mask."""

    def problem(self) -> str | None:
        """Why these settings cannot give masks (checked in mask mode), or None."""
        if self.source == "real" and not self.dataset:
            return "masks.source=real draws real masks: set masks.dataset to an ingested image+mask dataset"
        if self.source == "shape_model" and not (self.shape_model or self.dataset):
            return ("masks.source=shape_model needs a model: set masks.shape_model to a saved shape_model.json, "
                    "or masks.dataset to an ingested image+mask dataset to fit one on")
        if self.source == "shape_model" and self.shape_model and self.dataset:
            return ("masks.shape_model and masks.dataset are both set: the saved model is used as is; drop "
                    "masks.dataset (or masks.shape_model to fit a new model on the dataset)")
        if self.source == "real" and self.shape_model:
            return "masks.shape_model is for masks.source=shape_model; drop it (source real draws real masks)"
        return None


class GenerateConfig(Config):
    """``sonosynth generate``: how many samples, from which model, on how many workers."""

    out: str
    """Destination dataset: a folder or s3://bucket/prefix."""
    num_samples: int = 64
    """Accepted samples to deliver."""
    sampler: SamplerConfig = SamplerConfig()
    """Base model, LoRA and sampling settings."""
    qc: QCConfig = QCConfig()
    """Quality filter: mask extraction (joint mode) or label fidelity with a segmenter (mask mode)."""
    mode: Literal["joint", "class", "mask"] | None = None
    """'joint' (image+mask), 'class' (one plane per prompt) or 'mask' (an image drawn for each given
    mask by sampler.controlnet); null: mask with a ControlNet, else the LoRA's training mode."""
    masks: MaskSourceConfig = MaskSourceConfig()
    """Mask mode: where the conditioning masks come from."""
    prompt: str | None = None
    """Joint and mask mode prompt (null: the one the ControlNet, else the LoRA, was trained with)."""
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
        self._check_mask_mode()
        return self

    @property
    def mask_mode(self) -> bool:
        """Mask mode, asked for or implied by a ControlNet."""
        return self.mode == "mask" or (self.mode is None and bool(self.sampler.controlnet))

    def _check_mask_mode(self) -> None:
        if self.mode == "mask" and not self.sampler.controlnet:
            raise ValueError("mask mode draws an image for each mask with a ControlNet: pass --controlnet "
                             "(sampler.controlnet: a train-controlnet model folder, s3:// prefix or MLflow URI, "
                             "e.g. models:/sonosynth-controlnet@champion)")
        if self.sampler.controlnet and self.mode in LORA_MODES:
            raise ValueError(f"--controlnet (sampler.controlnet) is for mask mode, not {self.mode} mode: "
                             f"drop it, or pass --mode mask")
        if not self.mask_mode:
            if self.masks != MaskSourceConfig():
                raise ValueError("masks.* is for mask mode: pass --mode mask --controlnet <ControlNet>, or drop it")
            if self.qc.segmenter:
                raise ValueError("qc.segmenter is for mask mode (label fidelity of the given masks); drop it")
            return
        if self.planes is not None or self.per_class is not None:
            raise ValueError("planes and per_class are for class mode; mask mode takes num_samples (drop them)")
        joint_only = [k for k in QCConfig.model_fields if k not in MASK_MODE_QC
                      and getattr(self.qc, k) != QCConfig.model_fields[k].default]
        if joint_only:
            raise ValueError(f"{', '.join('qc.' + k for k in joint_only)}: joint-mode mask extraction settings, "
                             f"but mask mode keeps the conditioning mask as drawn; drop them (mask mode's QC is "
                             f"qc.segmenter and qc.min_label_fidelity)")
        problem = self.masks.problem()
        if problem:
            raise ValueError(problem)


def per_class_mismatch(num_samples: int, per_class: int, planes: int) -> str:
    return (f"num_samples={num_samples} but per_class={per_class} x {planes} planes = {per_class * planes}; "
            f"give one of them (per_class sets num_samples in class mode)")


def sample_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of sample ``index``'s attempt ``attempt``."""
    return derive_seed("generate", seed, index, attempt)


def mask_seed(seed: int, index: int, attempt: int) -> int:
    """Mask mode: the seed of the conditioning mask of sample ``index``'s attempt ``attempt``."""
    return derive_seed("generate-mask", seed, index, attempt)


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
    controlnet: dict[str, Any] | None = None
    """Mask mode: {sha256, lineage} of the ControlNet."""
    masks: dict[str, Any] | None = None
    """Mask mode: the mask source (``driver.mask_source``): source, identity, lineage and what draws."""
    segmenter_sha256: str | None = None
    """Mask mode: sha256 of the QC segmenter's weights (None: no QC)."""

    def spec(self, cfg: GenerateConfig, index: int, attempt: int) -> SampleSpec:
        plane = self.planes[index % len(self.planes)] if self.mode == "class" else cfg.plane
        prompt = self.prompts[plane if self.mode == "class" else ""]
        return SampleSpec(index, attempt, sample_seed(cfg.seed, index, attempt), prompt, plane)


def plan_job(cfg: GenerateConfig, lineage: dict[str, Any], lora_sha: str | None, *,
             controlnet: dict[str, Any] | None = None, masks: dict[str, Any] | None = None,
             segmenter_sha: str | None = None) -> JobPlan:
    """The job's run id and shard tasks. Mask mode also takes the ControlNet ({sha256, lineage}), the
    mask source (``driver.mask_source``) and the QC segmenter's sha256."""
    mode = "mask" if cfg.mask_mode else cfg.mode or lineage.get("mode") or "joint"
    if mode == "mask":
        return _plan_mask_mode(cfg, lineage, lora_sha, controlnet, masks, segmenter_sha)
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
    # (the mask-mode fields are left out, so joint and class runs keep their run ids)
    identity = {"sampler": cfg.sampler.model_dump(mode="json", exclude=SAMPLER_NOT_IDENTITY | MASK_MODE_SAMPLER),
                "lora_sha256": lora_sha, "qc": cfg.qc.model_dump(mode="json", exclude=set(FIDELITY_QC)),
                "mode": mode, "prompts": prompts, "seed": cfg.seed, "max_attempts": cfg.max_attempts}
    if mode == "class":
        identity["planes"] = list(planes)
    else:
        identity["plane"] = cfg.plane
    return _with_tasks(cfg, JobPlan(_run_id(identity), mode, prompts, planes, lineage))


SAMPLER_NOT_IDENTITY = {"batch_size", "compile", "lora", "controlnet"}
"""Sampler fields that do not change the images (the LoRA and ControlNet count by their sha256)."""
MASK_MODE_SAMPLER = {"controlnet_scale"}


def _run_id(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def _plan_mask_mode(cfg: GenerateConfig, lineage: dict[str, Any], lora_sha: str | None,
                    controlnet: dict[str, Any] | None, masks: dict[str, Any] | None,
                    segmenter_sha: str | None) -> JobPlan:
    if controlnet is None or masks is None:
        raise ValueError("a mask-mode plan needs the ControlNet ({sha256, lineage}) and the mask source")
    trained = controlnet.get("lineage") or {}
    want = trained.get("lora_sha256")
    if want and want != lora_sha:
        given = f"--lora has sha256 {lora_sha[:12]}..." if lora_sha else "no --lora is given"
        raise ValueError(f"the ControlNet was trained with the LoRA {trained.get('lora') or ''} (sha256 "
                         f"{want[:12]}...) fused into the base model, but {given}: pass that LoRA with --lora "
                         f"(sampler.lora)")
    if lora_sha and not want:
        log.warning("the ControlNet was trained on the base model without a LoRA, but a LoRA is fused in for "
                    "sampling: the images may not follow the masks as well")
    if trained.get("base_model") and trained["base_model"] != cfg.sampler.model.identity():
        log.warning("the ControlNet was trained on base model %s; sampling with %s", trained["base_model"],
                    cfg.sampler.model.identity())
    prompts = {"": cfg.prompt or trained.get("prompt") or (lineage.get("prompts") or [PAPER_A_PROMPT])[0]}
    identity = {"sampler": cfg.sampler.model_dump(mode="json", exclude=SAMPLER_NOT_IDENTITY),
                "lora_sha256": lora_sha, "mode": "mask", "prompts": prompts, "plane": cfg.plane, "seed": cfg.seed,
                "max_attempts": cfg.max_attempts,
                "controlnet": {"sha256": controlnet["sha256"],
                               **{k: trained.get(k) for k in ("resolution", "clip_skip")}},
                "masks": masks["identity"],
                "qc": {"segmenter_sha256": segmenter_sha, "min_label_fidelity": cfg.qc.min_label_fidelity,
                       "min_pixels": cfg.qc.min_pixels, "enforce": cfg.qc.enforce}}
    plan = JobPlan(_run_id(identity), "mask", prompts, [], lineage, controlnet=controlnet, masks=masks,
                   segmenter_sha256=segmenter_sha)
    return _with_tasks(cfg, plan)


def _with_tasks(cfg: GenerateConfig, plan: JobPlan) -> JobPlan:
    run_id = plan.run_id
    for start in range(0, cfg.num_samples, cfg.shard_size):
        indices = list(range(start, min(cfg.num_samples, start + cfg.shard_size)))
        task_plan = hashlib.sha256(json.dumps({"run": run_id, "indices": indices, "shard_size": cfg.shard_size},
                                              sort_keys=True).encode()).hexdigest()
        plan.tasks.append({"shard_index": start // cfg.shard_size, "indices": indices, "plan": task_plan})
    return plan
