"""What runs on every training rank: task, DeepSpeed engine, resume, steps, checkpoints."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sonosynth.infra.storage import Storage, open_storage
from sonosynth.infra.tracking import Tracker

TRACKING_RECORD = "tracking.json"
SUMMARY = "summary.json"


@dataclass
class WorkerContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    storage: Storage

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        if not torch.distributed.is_initialized() or self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


class TrainTask:
    """One recipe family's model, data and loss, built on every rank from the stage config.

    ``module()`` returns the nn.Module that DeepSpeed wraps; its ``forward(batch, generator)``
    returns the scalar loss, drawing all randomness from ``generator`` (seeded per step, so
    a resumed run repeats the same noise).
    """

    def __init__(self, cfg, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx

    def module(self) -> torch.nn.Module: ...
    def param_groups(self) -> list[dict]: ...
    def num_examples(self) -> int: ...
    def batch(self, indices: list[int]) -> dict[str, Any]: ...

    def evaluate(self, module: torch.nn.Module) -> dict[str, float]:
        """Metrics on a fixed set (rank 0 only); the default is none."""
        return {}

    def on_start(self, tracker: Tracker) -> None:
        """Log what the model will see (rank 0)."""

    def export(self, module: torch.nn.Module, folder: Path, tracker: Tracker) -> dict[str, Any]:
        """Write the final model into ``folder`` (rank 0); returns lineage for summary.json."""
        raise NotImplementedError


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def example_indices(n: int, seed: int, *, step: int, micro: int, rank: int, world: int,
                    micro_batch: int, grad_accum: int) -> list[int]:
    """The examples of one rank's micro-batch: a seeded permutation per epoch, read in order."""
    start = ((step * grad_accum + micro) * world + rank) * micro_batch
    return [int(_permutation(n, seed, p // n)[p % n]) for p in range(start, start + micro_batch)]


def noise_seed(seed: int, step: int, micro: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def job_fingerprint(cfg) -> str:
    """Identifies a finished job: its identity plus how long it trains."""
    key = {**cfg.job_identity(), "engine.max_steps": cfg.engine.max_steps, "engine.epochs": cfg.engine.epochs}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _context(storage: Storage) -> WorkerContext:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                         ray.train.torch.get_device(), storage)


def _progress(ctx: WorkerContext, enabled: bool, total: int, start: int, desc: str):
    if not (enabled and ctx.is_main):
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=desc, unit="step")
    bar.update(start)
    return bar


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point; ``config`` = {config_class, config}."""
    cfg = _import(config["config_class"]).model_validate(config["config"])
    storage = open_storage(cfg.out, cfg.storage)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(cfg.engine.cpus_per_worker)
    import deepspeed

    from sonosynth.trainers.checkpoint import CheckpointStore
    from sonosynth.trainers.engine import ds_config
    from sonosynth.trainers.optim import build_optimizer

    ctx = _context(storage)
    task: TrainTask = _import(cfg.task_class)(cfg, ctx)
    n = task.num_examples()
    total = cfg.engine.total_steps(n)
    module = task.module()
    optimizer, scheduler = build_optimizer(task.param_groups(), cfg.optim, total)
    on_gpu = ctx.device.type == "cuda"
    ds = ds_config(cfg.engine, cfg.optim, ctx.world, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, dist_init_required=False)
    store = CheckpointStore(storage, keep=cfg.engine.keep_checkpoints)
    latest = store.latest()
    state = store.load(engine, latest, world=ctx.world).get("state", {}) if latest else {}
    start = latest["step"] if latest else 0
    if ctx.is_main and start:
        print(f"resuming from checkpoint step {start} of {total}", flush=True)
    state["resumed_from_step"] = start

    tracker = _open_tracker(cfg, ctx)
    if ctx.is_main and start == 0:
        tracker.log_params(cfg.flat())
        tracker.log_params({"data.num_examples": n, "engine.total_steps": total,
                            "engine.global_batch": cfg.engine.global_batch()})
        task.on_start(tracker)
        state["eval_start"] = task.evaluate(engine.module)
        tracker.log_metrics(state["eval_start"], 0)
    bar = _progress(ctx, cfg.engine.progress, total, start, type(task).__name__)
    try:
        run_steps(cfg, ctx, task, engine, store, tracker, state, start, total, n, bar)
    except BaseException:
        if ctx.is_main:
            tracker.close("FAILED")
        raise
    finally:
        if bar is not None:
            bar.close()
    if ctx.is_main:
        _finish(cfg, ctx, task, engine, tracker, state, total, n)
    ctx.barrier()


def _open_tracker(cfg, ctx: WorkerContext) -> Tracker:
    """Rank 0 opens (or, on resume, reopens) the job's single MLflow run; others get a no-op."""
    offline = Path(tempfile.gettempdir()) / "sonosynth-tracking" / hashlib.sha1(cfg.out.encode()).hexdigest()[:12]
    if cfg.out and "://" not in cfg.out:
        offline = Path(cfg.out) / "tracking-offline"
    record = {}
    if ctx.is_main and ctx.storage.exists(TRACKING_RECORD):
        record = json.loads(ctx.storage.get_text(TRACKING_RECORD))
    tracker = Tracker(cfg.tracking, enabled=ctx.is_main, offline_dir=offline,
                      experiment=cfg.experiment, run_id=record.get("run_id"))
    if ctx.is_main and tracker.start(tags={"sonosynth.stage": cfg.experiment, "sonosynth.out": cfg.out}):
        record.update(run_id=tracker.run_id, uri=tracker.uri)
        ctx.storage.put_text(TRACKING_RECORD, json.dumps(record))
    return tracker


def run_steps(cfg, ctx: WorkerContext, task: TrainTask, engine, store, tracker: Tracker,
              state: dict[str, Any], start: int, total: int, n: int, bar) -> None:
    e = cfg.engine
    # On the device: NCCL reduces only GPU tensors, and no .item() sync per micro-batch.
    loss_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    t_last, step_last = time.perf_counter(), start
    for step in range(start, total):
        engine.train()
        for micro in range(e.grad_accum):
            idx = example_indices(n, e.seed, step=step, micro=micro, rank=ctx.rank, world=ctx.world,
                                  micro_batch=e.micro_batch, grad_accum=e.grad_accum)
            generator = torch.Generator().manual_seed(noise_seed(e.seed, step, micro, ctx.rank))
            loss = engine(task.batch(idx), generator)
            engine.backward(loss)
            engine.step()
            loss_sum[0] += loss.detach().double()
            loss_sum[1] += 1
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % e.log_every == 0 or done == total:
            torch.distributed.all_reduce(loss_sum)
            now = time.perf_counter()
            rate = (done - step_last) / max(now - t_last, 1e-9)
            metrics = {"train/loss": float(loss_sum[0] / loss_sum[1]), "train/lr": engine.get_lr()[0],
                       "perf/steps_per_s": rate, "perf/samples_per_s": rate * e.global_batch()}
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            if ctx.is_main:
                tracker.log_metrics(metrics, done)
                state.setdefault("loss_first", metrics["train/loss"])
                state["loss_last"] = metrics["train/loss"]
            loss_sum.zero_()
            t_last, step_last = now, done
        if done % e.checkpoint_every == 0 or done == total:
            if ctx.is_main:
                state["eval_last"] = task.evaluate(engine.module)
                tracker.log_metrics(state["eval_last"], done)
            store.save(engine, done, {"state": state}, rank=ctx.rank, world=ctx.world)


def _finish(cfg, ctx: WorkerContext, task: TrainTask, engine, tracker: Tracker,
            state: dict[str, Any], total: int, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="sonosynth-export-") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        lineage = task.export(engine.module, folder, tracker)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                ctx.storage.put_file(f"model/{path.relative_to(folder)}", path)
        tracker.log_artifact(folder, "model")
        version = None
        record = json.loads(ctx.storage.get_text(TRACKING_RECORD)) if ctx.storage.exists(TRACKING_RECORD) else {}
        name = cfg.tracking.registered_model if cfg.tracking.registered_model is not None else cfg.registered_model
        if record.get("model_version"):
            version = record["model_version"]
        elif name:
            version = tracker.register("model", name)
            if version:
                ctx.storage.put_text(TRACKING_RECORD, json.dumps({**record, "model_version": version,
                                                                  "registered_model": name}))
    summary = {
        "job": job_fingerprint(cfg), "steps": total, "examples": n, "workers": ctx.world,
        "resumed_from_step": state.get("resumed_from_step", 0),
        "loss_first": state.get("loss_first"), "loss_last": state.get("loss_last"),
        "eval_start": state.get("eval_start", {}), "eval_end": state.get("eval_last", {}),
        "model": ctx.storage.url("model"), "lineage": lineage,
        "mlflow": {"uri": tracker.uri if tracker.enabled else None, "run_id": tracker.run_id,
                   "registered_model": name if version else None, "version": version,
                   "offline": tracker.offline},
    }
    ctx.storage.put_text(SUMMARY, json.dumps(summary, indent=1, default=str))
    tracker.log_text(json.dumps(summary, indent=1, default=str), "summary.json")
    tracker.close("FINISHED")
