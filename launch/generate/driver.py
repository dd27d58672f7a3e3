"""The generate job's driver: plan, resume, hand shards to sampler actors, write the manifest."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import numpy as np

from sonosynth.datasets.manifest import write_manifest
from sonosynth.datasets.records import encode_png
from sonosynth.datasets.shards import SHARDS_DIR, ShardRecord, done_key, remove_stale, shard_key, split_completed
from sonosynth.infra.jobdir import claim_output, offline_dir_for
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import Storage, open_storage
from sonosynth.infra.tracking import Tracker
from sonosynth.launch.generate.config import GenerateConfig, JobPlan, plan_job
from sonosynth.launch.generate.pool import PoolError, SamplerPool
from sonosynth.launch.generate.worker import ATTEMPTS_EXHAUSTED, SamplerWorker, shard_name

log = logging.getLogger(__name__)
IN_FLIGHT_PER_ACTOR = 2


class GenerationError(StageFailed):
    """The job could not deliver; the message says what is missing and what to change."""


def _lora_payload(cfg: GenerateConfig) -> tuple[dict[str, bytes] | None, str | None, dict[str, Any]]:
    """Fetch the LoRA once, here: (its files, the sha256 of its weights, its lineage)."""
    from sonosynth.trainers.diffusion.sampler import read_lineage, resolve_lora

    if not cfg.sampler.lora:
        return None, None, {}
    folder, sha = resolve_lora(cfg.sampler.lora, cfg.tracking.resolved_uri())
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return files, sha, read_lineage(folder)


def _actor_count(cfg: GenerateConfig) -> tuple[int, bool]:
    """(sampler actors, on GPU?): ``workers`` if set, else one per GPU of every alive node, else
    one per ``cpus_per_worker`` CPUs of every alive node (counted per node: CPUs split across
    nodes do not add up to an actor)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    if cfg.workers is not None:
        return cfg.workers, gpus >= cfg.workers
    if gpus:
        return gpus, True
    return max(1, sum(int(r.get("CPU", 0)) // cfg.cpus_per_worker for r in nodes)), False


def _actor_options(cfg: GenerateConfig, use_gpu: bool) -> dict[str, Any]:
    """Placement: each actor holds one GPU (or ``cpus_per_worker`` CPUs) and the actors are
    SPREAD over the nodes, so a multi-node cluster gets one per GPU on every node rather than
    the first nodes packed; on an autoscaling cluster the actors that do not fit yet wait for
    the nodes they ask for. Ray restarts nothing: the pool replaces a lost actor itself."""
    return dict(num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=0,
                max_concurrency=IN_FLIGHT_PER_ACTOR, scheduling_strategy="SPREAD")


def _run_tasks(cfg: GenerateConfig, plan: JobPlan, todo: list[dict], lora_files, lora_sha, on_done) -> float:
    """Sample ``todo`` on a pool of actors (``pool.SamplerPool``: lost tasks drawn again, lost
    actors replaced); ``on_done(result)`` once per finished shard. Returns seconds."""
    import ray

    from sonosynth.infra.cluster import connect

    connect(cfg.ray)
    n_actors, use_gpu = _actor_count(cfg)
    actor_cls = ray.remote(SamplerWorker).options(**_actor_options(cfg, use_gpu))
    plan_dict = dataclasses.asdict(plan)
    plan_dict["tasks"] = []
    cfg_dict, files_ref = cfg.to_dict(), ray.put(lora_files)
    pool = SamplerPool(lambda: actor_cls.remote(cfg_dict, plan_dict, files_ref, lora_sha), actors=n_actors,
                       in_flight_per_actor=IN_FLIGHT_PER_ACTOR, max_task_losses=cfg.max_task_losses,
                       replacement_wait_s=cfg.replacement_wait_s,
                       needs="1 GPU" if use_gpu else f"{cfg.cpus_per_worker} CPU")
    t0 = time.perf_counter()
    try:
        pool.run(todo, on_done)
    except PoolError as err:
        raise GenerationError(f"{err} (the shards already written are kept)") from err
    finally:
        if pool.actors_lost:
            log.warning("%d sampler actors were lost and replaced during the job", pool.actors_lost)
    return time.perf_counter() - t0


def run_generate(cfg: GenerateConfig, progress: bool | None = None) -> dict[str, Any]:
    progress = cfg.progress if progress is None else progress
    storage = open_storage(cfg.out, cfg.storage)
    lora_files, lora_sha, lineage = _lora_payload(cfg)
    plan = plan_job(cfg, lineage, lora_sha)
    claim_output(storage, stage="generate", identity={"run_id": plan.run_id}, config_yaml=cfg.to_yaml(),
                 foreign_marker=f"{SHARDS_DIR}/")
    name = shard_name(plan.run_id)
    remove_stale(storage, name, {shard_key(name, t["shard_index"]) for t in plan.tasks})
    finished, todo = split_completed(storage, plan.tasks, plan=lambda t: t["plan"],
                                     done=lambda t: done_key(shard_key(name, t["shard_index"])))
    records: dict[int, ShardRecord] = {plan.tasks[i]["shard_index"]: r for i, r in finished.items()}
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

    seconds = _run_tasks(cfg, plan, todo, lora_files, lora_sha, on_done) if todo else 0.0
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

    tracker = Tracker(cfg.tracking, experiment="sonosynth-generate", offline_dir=offline_dir_for(cfg.out))
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


def run(cfg: GenerateConfig) -> Report:
    """The generate stage (raises GenerationError, exit 1, when it cannot deliver N samples)."""
    r = run_generate(cfg)
    rate = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "n/a"
    lines = [f"generated {r['accepted']}/{r['requested']} samples (run {r['run_id']}, {r['mode']} mode) "
             f"in {r['shards']} shards; {r['shards_reused']} shards were already complete",
             f"  acceptance {rate}; rejected: {r['rejected_by_reason'] or 'none'}"]
    if r.get("steady_samples_per_s"):
        lines.append(f"  {r['steady_samples_per_s']:.2f} accepted samples/s while sampling "
                     f"({r['samples_per_s']:.2f}/s over {r['seconds']:.1f} s including model loading)")
    out = r["out"].rstrip("/")
    return Report(stage="generate", out=r["out"], text="\n".join(lines),
                  figures={k: v for k, v in r.items() if k != "mlflow"},
                  outputs={"dataset": r["out"], "grid": f"{out}/samples_grid.png"}, tracking=r.get("mlflow") or {})
