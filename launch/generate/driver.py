"""The generate job's driver: plan, resume, hand shards to sampler actors, write the manifest.

Models are fetched and hashed once, here (the LoRA, and in mask mode the ControlNet and the
QC segmenter), and handed to the actors as bytes with their hashes. In mask mode the mask
source is settled here too: a saved shape model, one fitted now on ``masks.dataset`` (saved to
OUT/shape_model.json once the output is claimed), or the real masks of ``masks.dataset``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sonosynth.datasets.manifest import write_manifest
from sonosynth.datasets.records import decode_png, encode_png
from sonosynth.datasets.shape_model import ShapeModel, dataset_masks
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
SHAPE_MODEL = "shape_model.json"
"""Where a shape model fitted at plan time is saved in OUT."""


class GenerationError(StageFailed):
    """The job could not deliver; the message says what is missing and what to change."""


def _lora_payload(cfg: GenerateConfig) -> tuple[dict[str, bytes] | None, str | None, dict[str, Any]]:
    """Fetch the LoRA once, here: (its files, the sha256 of its weights, its lineage)."""
    from sonosynth.trainers.diffusion.sampler import read_lineage, resolve_lora

    if not cfg.sampler.lora:
        return None, None, {}
    folder, sha = resolve_lora(cfg.sampler.lora, cfg.tracking.resolved_uri())
    return _folder_files(folder), sha, read_lineage(folder)


def _folder_files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class MaskModeInputs:
    """What mask mode settles on the driver: the plan's parts, the actors' files, a model to save."""

    controlnet: dict[str, Any]
    """{source, sha256, lineage} of the ControlNet."""
    masks: dict[str, Any]
    """The mask source (``mask_source``)."""
    segmenter_sha256: str | None = None
    files: dict[str, Any] = field(default_factory=dict)
    """{controlnet, masks, segmenter}: file bytes for the actors."""
    fitted: ShapeModel | None = None
    """A shape model fitted now, saved to OUT/shape_model.json after the claim."""


def _mask_mode_inputs(cfg: GenerateConfig) -> MaskModeInputs | None:
    from sonosynth.infra.model_registry import fetch_model_folder
    from sonosynth.trainers.diffusion.sampler import CONTROLNET_FOLDER, read_lineage, resolve_controlnet, weights_sha256
    from sonosynth.trainers.sam.models import WEIGHTS_FILE

    if not cfg.mask_mode:
        return None
    tracking = cfg.tracking.resolved_uri()
    folder, sha = resolve_controlnet(cfg.sampler.controlnet, tracking)
    trained = read_lineage(folder, CONTROLNET_FOLDER)
    masks, mask_files, fitted = mask_source(cfg, cfg.masks.frame or trained.get("resize") or "pad")
    inputs = MaskModeInputs({"source": cfg.sampler.controlnet, "sha256": sha, "lineage": trained}, masks,
                            files={"controlnet": _folder_files(folder), "masks": mask_files}, fitted=fitted)
    if cfg.qc.segmenter:
        seg = fetch_model_folder(cfg.qc.segmenter, tracking, required=WEIGHTS_FILE, what="segmenter (qc.segmenter)",
                                 hint="the model/ folder of a `sonosynth train-sam` run, or its MLflow model "
                                      "(models:/sonosynth-sam@champion)")
        inputs.segmenter_sha256, inputs.files["segmenter"] = weights_sha256(seg, WEIGHTS_FILE), _folder_files(seg)
    else:
        log.warning("mask mode without qc.segmenter: no quality filter, every image is kept with its conditioning "
                    "mask (set qc.segmenter to a train-sam model to filter by label fidelity)")
    return inputs


def mask_source(cfg: GenerateConfig, frame: str) -> tuple[dict[str, Any], dict[str, bytes] | None, ShapeModel | None]:
    """(the plan's mask source, the real mask files for the actors, a shape model fitted now).

    The source's identity (in the run id) is its content: the shape model's parameters, or the
    real masks' bytes with the split, squaring and augmentation."""
    m = cfg.masks
    if m.source == "real":
        files, about = dataset_masks(m.dataset, m.split, cfg.storage)
        augment = m.augment.to_dict()
        identity = {"source": "real", "masks_sha256": about["masks_sha256"], "split": m.split, "frame": frame,
                    "augment": augment}
        return ({"source": "real", "identity": identity, "lineage": {"source": "real", **about, "frame": frame,
                                                                     "augment": augment},
                 "keys": list(files), "frame": frame, "augment": augment}, files, None)
    fitted = None
    if m.shape_model:
        model = load_shape_model(m.shape_model, cfg)
        if model.frame != frame:
            log.warning("shape model %s was fitted in the %s frame, but the ControlNet was trained on %s-squared "
                        "masks (masks.frame)", m.shape_model, model.frame, frame)
    else:
        files, about = dataset_masks(m.dataset, m.split, cfg.storage)
        model = fitted = ShapeModel.fit((decode_png(b) for b in files.values()), m.shape, frame=frame,
                                        source={k: v for k, v in about.items() if k != "masks"})
        log.info("shape model fitted on %d masks of %s (%d skipped, %.0f%% at the border: partial heads %s)",
                 model.n_masks, m.dataset, model.skipped, 100 * model.border_fraction,
                 "allowed" if model.partial_heads else "kept inside")
    lineage = {"source": "shape_model", "sha256": model.sha256(), "path": m.shape_model or SHAPE_MODEL,
               "fitted_on": model.source}
    return ({"source": "shape_model", "identity": {"source": "shape_model", "sha256": model.sha256()},
             "lineage": lineage, "model": model.to_dict()}, None, fitted)


def load_shape_model(uri: str, cfg: GenerateConfig) -> ShapeModel:
    """A saved shape model: a .json file, or the output folder of a mask-mode job holding one (local
    or s3://)."""
    from sonosynth.infra.stage import InputNotFound
    from sonosynth.infra.storage import ObjectNotFound

    uri = uri.rstrip("/")
    parent, _, name = uri.rpartition("/") if uri.endswith(".json") else (uri, "/", SHAPE_MODEL)
    try:
        text = open_storage(parent or ".", cfg.storage).get_text(name)
    except (ObjectNotFound, FileNotFoundError):
        raise InputNotFound(f"masks.shape_model {uri} does not exist; point it at a shape_model.json written by a "
                            f"mask-mode `sonosynth generate`, or set masks.dataset to fit one") from None
    return ShapeModel.from_json(text, f"masks.shape_model {uri}")


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


def _run_tasks(cfg: GenerateConfig, plan: JobPlan, todo: list[dict], lora_files, lora_sha, on_done,
               mask_files: dict[str, Any] | None = None) -> float:
    """Sample ``todo`` on a pool of actors (``pool.SamplerPool``: lost tasks drawn again, lost
    actors replaced); ``on_done(result)`` once per finished shard. Returns seconds."""
    import ray

    from sonosynth.infra.cluster import connect

    connect(cfg.ray)
    n_actors, use_gpu = _actor_count(cfg)
    actor_cls = ray.remote(SamplerWorker).options(**_actor_options(cfg, use_gpu))
    plan_dict = dataclasses.asdict(plan)
    plan_dict["tasks"] = []
    cfg_dict, files_ref, mask_ref = cfg.to_dict(), ray.put(lora_files), ray.put(mask_files)
    pool = SamplerPool(lambda: actor_cls.remote(cfg_dict, plan_dict, files_ref, lora_sha, mask_ref), actors=n_actors,
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
    mask_mode = _mask_mode_inputs(cfg)
    if mask_mode is None:
        plan = plan_job(cfg, lineage, lora_sha)
    else:
        plan = plan_job(cfg, lineage, lora_sha, controlnet=mask_mode.controlnet, masks=mask_mode.masks,
                        segmenter_sha=mask_mode.segmenter_sha256)
    claim_output(storage, stage="generate", identity={"run_id": plan.run_id}, config_yaml=cfg.to_yaml(),
                 foreign_marker=f"{SHARDS_DIR}/")
    if mask_mode is not None and mask_mode.fitted is not None:
        storage.put_text(SHAPE_MODEL, mask_mode.fitted.to_json())
    name = shard_name(plan.run_id)
    remove_stale(storage, name, {shard_key(name, t["shard_index"]) for t in plan.tasks})
    finished, todo = split_completed(storage, plan.tasks, plan=lambda t: t["plan"],
                                     done=lambda t: done_key(shard_key(name, t["shard_index"])))
    records: dict[int, ShardRecord] = {plan.tasks[i]["shard_index"]: r for i, r in finished.items()}
    stats = {"images": 0, "sampling_s": 0.0, "accepted_now": 0, "first": None, "last": None}
    bar = None
    if progress and todo:
        from sonosynth.infra.progress import Progress

        bar = Progress(cfg.num_samples, "generate", "sample", initial=sum(r.num_samples for r in records.values()))
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

    seconds = _run_tasks(cfg, plan, todo, lora_files, lora_sha, on_done,
                         mask_mode.files if mask_mode else None) if todo else 0.0
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
    if plan.masks is not None:
        report["masks"] = plan.masks["lineage"]
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
    if plan.masks is not None and "model" in plan.masks:
        tracker.log_text(json.dumps(plan.masks["model"], indent=1, sort_keys=True), SHAPE_MODEL)
    tracker.close("FINISHED")
    return {"uri": tracker.uri if tracker.enabled else None, "run_id": tracker.run_id, "offline": tracker.offline}


def masks_line(masks: dict[str, Any], out: str) -> str:
    """Where mask mode's conditioning masks came from, in a line."""
    fitted_on = masks.get("fitted_on") or {}
    if masks["source"] == "real":
        return f"real masks of {masks['dataset']} (split {masks['split']}), squared ({masks['frame']}) and augmented"
    if masks["path"] == SHAPE_MODEL:
        return (f"shape model {masks['sha256'][:12]} fitted on {fitted_on.get('dataset')}, saved to "
                f"{out.rstrip('/')}/{SHAPE_MODEL}")
    return f"shape model {masks['sha256'][:12]} from {masks['path']}"


def run(cfg: GenerateConfig) -> Report:
    """The generate stage (raises GenerationError, exit 1, when it cannot deliver N samples)."""
    r = run_generate(cfg)
    rate = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "n/a"
    lines = [f"generated {r['accepted']}/{r['requested']} samples (run {r['run_id']}, {r['mode']} mode) "
             f"in {r['shards']} shards; {r['shards_reused']} shards were already complete",
             f"  acceptance {rate}; rejected: {r['rejected_by_reason'] or 'none'}"]
    if r.get("masks"):
        lines.append("  masks: " + masks_line(r["masks"], out=r["out"]))
    if r.get("steady_samples_per_s"):
        lines.append(f"  {r['steady_samples_per_s']:.2f} accepted samples/s while sampling "
                     f"({r['samples_per_s']:.2f}/s over {r['seconds']:.1f} s including model loading)")
    out = r["out"].rstrip("/")
    outputs = {"dataset": r["out"], "grid": f"{out}/samples_grid.png"}
    if (r.get("masks") or {}).get("path") == SHAPE_MODEL:
        outputs["shape_model"] = f"{out}/{SHAPE_MODEL}"
    return Report(stage="generate", out=r["out"], text="\n".join(lines),
                  figures={k: v for k, v in r.items() if k != "mlflow"}, outputs=outputs,
                  tracking=r.get("mlflow") or {})
