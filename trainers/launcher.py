"""The driver of a training job: claims the output, joins Ray, starts the engine on N workers.

``train(cfg)`` runs where the stage was started (the CLI, the pipeline, a test). It claims
``cfg.out`` for this job (a different job's output is refused; the same job resumes), returns
a finished job's summary without starting Ray, and otherwise starts a Ray Train
``TorchTrainer`` whose workers run ``engine.train_worker`` on the job packed by
``tasks.pack_job`` (so a task defined outside sonosynth, e.g. in a test, trains too).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sonosynth.infra.config import ConfigError
from sonosynth.infra.stage import StageFailed
from sonosynth.trainers.config import TrainStageConfig, job_fingerprint


class TrainingError(StageFailed):
    """The training job failed after its retries; the message carries the worker's error."""


def train(cfg: TrainStageConfig) -> dict[str, Any]:
    """Run (or resume) the training job described by ``cfg``; returns its summary.json."""
    from sonosynth.infra.cluster import cluster_gpus, connect
    from sonosynth.infra.jobdir import claim_output
    from sonosynth.infra.progress import remote_progress
    from sonosynth.infra.storage import open_storage
    from sonosynth.trainers.engine import SUMMARY
    from sonosynth.trainers.tasks import pack_job

    storage = open_storage(cfg.out, cfg.storage)
    claim_output(storage, stage=cfg.stage_name(), identity=cfg.job_identity(), config_yaml=cfg.to_yaml())
    if storage.exists(SUMMARY):
        summary = json.loads(storage.get_text(SUMMARY))
        if summary.get("job") == job_fingerprint(cfg):
            return {**summary, "already_complete": True}
    job = pack_job(cfg)
    connect(cfg.ray)
    gpus = cluster_gpus()
    if cfg.engine.device == "gpu" and gpus < cfg.engine.workers:
        raise ConfigError(f"engine.device=gpu needs {cfg.engine.workers} GPUs and the Ray cluster has "
                           f"{gpus}; lower engine.workers or use engine.device=auto")
    use_gpu = cfg.engine.device == "gpu" or (cfg.engine.device == "auto" and gpus >= cfg.engine.workers)
    resources = {"CPU": cfg.engine.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    with remote_progress(cfg.stage_name(), "step", enabled=cfg.engine.progress) as counter:
        _fit(cfg, job, counter, use_gpu, resources)
    return json.loads(storage.get_text(SUMMARY))


def _fit(cfg: TrainStageConfig, job: dict[str, Any], counter: Any, use_gpu: bool, resources: dict[str, Any]) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from sonosynth.trainers.engine import train_worker

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "progress": counter},
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
