"""The generate job's driver: plan, resume, hand shards to sampler actors, write the manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

import numpy as np

from sonosynth.datasets.manifest import write_manifest
from sonosynth.datasets.records import encode_png
from sonosynth.datasets.shards import SHARDS_DIR, ShardRecord, done_key, find_completed, shard_key
from sonosynth.infra.config import ConfigError
from sonosynth.infra.storage import Storage, open_storage
from sonosynth.infra.tracking import Tracker
from sonosynth.launch.generate import GENERATION_RECORD, GenerateConfig, JobPlan, plan_job
from sonosynth.launch.generate_worker import ATTEMPTS_EXHAUSTED, SamplerWorker, shard_name

log = logging.getLogger(__name__)
IN_FLIGHT_PER_ACTOR = 2


class GenerationError(RuntimeError):
    """The job could not deliver; the message says what is missing and what to change."""


def _guard(storage: Storage, cfg: GenerateConfig, plan: JobPlan) -> None:
    if storage.exists(GENERATION_RECORD):
        old = json.loads(storage.get_text(GENERATION_RECORD))
        if old.get("run_id") != plan.run_id:
            raise ConfigError(
                f"{storage.url('')} holds generation run {old.get('run_id')} and this config makes run "
                f"{plan.run_id} (model, LoRA, sampler, QC or seed differ); write to a new --out, or delete it")
    elif storage.list(f"{SHARDS_DIR}/"):
        raise ConfigError(f"{storage.url('')} already holds a dataset that no generate job wrote; use a new --out")
    storage.put_text(GENERATION_RECORD, json.dumps({"run_id": plan.run_id, "mode": plan.mode,
                                                    "num_samples": cfg.num_samples}))
    storage.put_text("config.yaml", cfg.to_yaml())


def _remove_stale(storage: Storage, plan: JobPlan) -> None:
    """Shards of an earlier, larger run of the same job (fewer samples asked now)."""
    wanted = {shard_key(shard_name(plan.run_id), t["shard_index"]) for t in plan.tasks}
    for key in storage.list(f"{SHARDS_DIR}/"):
        if key not in wanted:
            storage.delete(done_key(key))
            storage.delete(key)


def _actor_count(cfg: GenerateConfig) -> tuple[int, bool]:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg.workers is not None:
        return cfg.workers, gpus >= cfg.workers
    if gpus:
        return gpus, True
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.cpus_per_worker), False


def _run_tasks(cfg: GenerateConfig, plan: JobPlan, todo: list[dict], on_done) -> float:
    """Sample ``todo`` on actors; ``on_done(result)`` per finished shard. Returns seconds."""
    import ray

    from sonosynth.infra.cluster import connect

    connect(cfg.ray)
    n_actors, use_gpu = _actor_count(cfg)
    n_actors = min(n_actors, len(todo))
    actor_cls = ray.remote(SamplerWorker).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_task_retries, max_concurrency=IN_FLIGHT_PER_ACTOR)
    plan_dict = dataclasses.asdict(plan)
    plan_dict["tasks"] = []
    uri = cfg.tracking.resolved_uri() if cfg.sampler.lora and cfg.sampler.lora.startswith(("models:/", "runs:/")) else None
    actors = [actor_cls.remote(cfg.to_dict(), plan_dict, uri) for _ in range(n_actors)]
    queue, in_flight, attempts = list(todo), {}, {}
    t0 = time.perf_counter()

    def submit(actor) -> None:
        task = queue.pop(0)
        attempts[task["shard_index"]] = attempts.get(task["shard_index"], 0) + 1
        in_flight[actor.run_shard.remote(task)] = (actor, task)

    for actor in actors:
        for _ in range(IN_FLIGHT_PER_ACTOR):
            if queue:
                submit(actor)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        actor, task = in_flight.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            if attempts[task["shard_index"]] > cfg.max_task_retries + 1:
                raise GenerationError(f"shard {task['shard_index']} failed {attempts[task['shard_index']]} "
                                      f"times; last error: {err}") from err
            log.warning("shard %d failed (%s); handing it out again", task["shard_index"], type(err).__name__)
            queue.insert(0, task)
            alive = [a for a in actors if a is not actor] or actors
            submit(alive[len(in_flight) % len(alive)])
            continue
        on_done(result)
        if queue:
            submit(actor)
    return time.perf_counter() - t0


def run_generate(cfg: GenerateConfig, progress: bool = True) -> dict[str, Any]:
    from sonosynth.trainers.diffusion.lora import WEIGHTS_NAME
    from sonosynth.trainers.diffusion.sampler import fetch_lora, read_lineage

    storage = open_storage(cfg.out, cfg.storage)
    lora_dir = fetch_lora(cfg.sampler.lora, cfg.tracking.resolved_uri()) if cfg.sampler.lora else None
    lineage = read_lineage(lora_dir)
    lora_sha = hashlib.sha256((lora_dir / WEIGHTS_NAME).read_bytes()).hexdigest() if lora_dir else None
    plan = plan_job(cfg, lineage, lora_sha)
    _guard(storage, cfg, plan)
    _remove_stale(storage, plan)
    records: dict[int, ShardRecord] = {}
    todo = []
    for task in plan.tasks:
        done = find_completed(storage, done_key(shard_key(shard_name(plan.run_id), task["shard_index"])), task["plan"])
        if done is not None:
            records[task["shard_index"]] = done
        else:
            todo.append(task)
    stats = {"images": 0, "sampling_s": 0.0, "accepted_now": 0, "first": None, "last": None}
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=cfg.num_samples, initial=sum(r.num_samples for r in records.values()),
                   desc=f"generate {plan.run_id}", unit="sample")
    t_start = time.perf_counter()

    def on_done(result: dict[str, Any]) -> None:
        record = ShardRecord(**result["record"])
        records[result["shard_index"]] = record
        stats["images"] += result["images"]
        stats["sampling_s"] += result["sampling_s"]
        stats["accepted_now"] += record.num_samples
        if "started" in result:
            stats["first"] = min(stats["first"] or result["started"], result["started"])
            stats["last"] = max(stats["last"] or result["finished"], result["finished"])
        if bar is not None:
            elapsed = time.perf_counter() - t_start
            bar.update(record.num_samples)
            bar.set_postfix(accept=f"{stats['accepted_now'] / max(stats['images'], 1):.0%}",
                            rate=f"{stats['accepted_now'] / elapsed:.2f}/s")

    seconds = _run_tasks(cfg, plan, todo, on_done) if todo else 0.0
    if bar is not None:
        bar.close()
    rows = [row for i in sorted(records) for row in records[i].rows]
    write_manifest(storage, rows)
    rejected = [r for rec in records.values() for r in rec.rejected]
    exhausted = sorted(r["index"] for r in rejected if r["reason"] == ATTEMPTS_EXHAUSTED)
    reasons: dict[str, int] = {}
    for r in rejected:
        if r["reason"] != ATTEMPTS_EXHAUSTED:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    accepted = len(rows)
    attempts_total = accepted + sum(reasons.values())
    report = {
        "run_id": plan.run_id, "mode": plan.mode, "out": storage.url(""), "requested": cfg.num_samples,
        "accepted": accepted, "shards": sum(1 for r in records.values() if r.shard),
        "shards_reused": len(plan.tasks) - len(todo), "rejected_by_reason": reasons,
        "acceptance_rate": accepted / attempts_total if attempts_total else None,
        "gave_up_indices": exhausted,
        "seconds": seconds, "samples_per_s": stats["accepted_now"] / seconds if seconds else None,
        "images_per_s": stats["images"] / seconds if seconds else None,
    }
    if stats["first"] is not None and stats["last"] > stats["first"]:
        steady = stats["last"] - stats["first"]  # first sample started to last shard published
        report.update(sampling_seconds=steady, steady_samples_per_s=stats["accepted_now"] / steady)
    report["mlflow"] = _track(cfg, plan, storage, report)
    storage.put_text("summary.json", json.dumps(report, indent=1))
    if accepted < cfg.num_samples:
        raise GenerationError(
            f"{accepted} of {cfg.num_samples} samples passed QC; {len(exhausted)} sample indices failed "
            f"all {cfg.max_attempts} attempts ({reasons}). Raise max_attempts, relax qc.*, or check the "
            f"LoRA; re-running resumes with the shards already written")
    return report


def _track(cfg: GenerateConfig, plan: JobPlan, storage: Storage, report: dict[str, Any]) -> dict[str, Any]:
    from sonosynth.datasets.preview import contact_sheet
    from sonosynth.datasets.reader import DatasetReader

    tracker = Tracker(cfg.tracking, experiment="sonosynth-generate",
                      offline_dir=None if "://" in cfg.out else f"{cfg.out}/tracking-offline")
    tracker.start(tags={"sonosynth.stage": "generate", "sonosynth.out": cfg.out,
                        "sonosynth.generation_run": plan.run_id})
    tracker.log_params({**cfg.flat(), "plan.run_id": plan.run_id, "plan.mode": plan.mode})
    tracker.log_metrics({k: float(v) for k, v in report.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}, 0)
    tracker.log_metrics({f"rejected/{k}": float(v) for k, v in report["rejected_by_reason"].items()}, 0)
    try:
        samples = []
        for s in DatasetReader(cfg.out, storage=cfg.storage, distributed=False).samples():
            samples.append(s)
            if len(samples) == 16:
                break
        if samples:
            sheet = contact_sheet(samples, cols=8)
            tracker.log_image(sheet, "samples_grid.png")
            storage.put_bytes("samples_grid.png", encode_png(np.asarray(sheet)))
    except Exception as err:  # noqa: BLE001 - a preview must never fail the job
        log.warning("could not draw the sample grid: %s", err)
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    tracker.log_text(json.dumps(report, indent=1, default=str), "summary.json")
    tracker.close("FINISHED")
    return {"uri": tracker.uri if tracker.enabled else None, "run_id": tracker.run_id, "offline": tracker.offline}
