"""The training engine: what runs on every rank, for every task (LoRA, SAM, classifier).

``launcher.train(cfg)`` starts N Ray Train workers; each calls ``train_worker``, which builds
the job's ``TrainTask`` and hands it to ``run``. ``run`` wraps the task's module with
``deepspeed.initialize`` on the process group Ray made, restores the last complete
checkpoint, builds the DataLoaders from the task's datasets, and runs the steps:

- data order: each rank's micro-batch indices are a pure function of (seed, step, micro,
  rank) (a seeded permutation per epoch), and every example is loaded with the global RNGs
  seeded from the same key, so a resumed job sees exactly the batches (augmentation
  included) an uninterrupted one would;
- noise: ``forward(batch, generator)`` gets a generator seeded per (seed, step, micro,
  rank), and the global torch RNG (dropout) is seeded per micro-batch too;
- metrics: the loss and the metrics ``forward`` returns are summed on the device and
  averaged across ranks (one all_reduce) every ``log_every`` steps;
- evaluation: every rank evaluates its share of the validation set at the start, every
  ``eval_every`` steps (default: at checkpoints) and at the end; sums and counts are
  all-reduced; the best evaluation by ``best_metric`` keeps its weights;
- checkpoints every ``checkpoint_every`` steps; at the end rank 0 exports the best (or the
  last) weights through the task, logs config, lineage and summary, and registers the model.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from sonosynth.infra.config import ConfigError
from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.storage import Storage, open_storage
from sonosynth.infra.tracking import Tracker
from sonosynth.trainers.batching import (  # noqa: F401 - example_indices, noise_seed: part of the engine's API
    ShareBatches, SeededExamples, StepBatches, example_indices, make_loader, noise_seed, to_device,
)
from sonosynth.trainers.task import TrainTask, WorkerContext

TRACKING_RECORD = "tracking.json"
SUMMARY = "summary.json"


def split_output(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """``forward``'s result as (loss, metrics)."""
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Mapping):
        return out[0], dict(out[1])
    raise TypeError(f"forward(batch, generator) must return the loss or (loss, {{name: value}}), "
                    f"not {type(out).__name__}")


def _scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A number or one-element tensor as a float64 scalar on ``device`` (no host sync)."""
    return torch.as_tensor(value).detach().to(device, torch.float64).reshape(())


class TrainMeter:
    """Loss and metrics summed on the device between log steps; one all_reduce averages them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, loss: torch.Tensor, metrics: dict[str, Any]) -> None:
        names = sorted(metrics)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"forward returned metrics {names} after {self.names}; return the same names "
                             f"on every micro-batch and rank")
        row = torch.stack([_scalar(loss, self.device)] + [_scalar(metrics[k], self.device) for k in names])
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def reduce(self, ctx: WorkerContext) -> dict[str, float]:
        """Averages over micro-batches and ranks: {"train/loss": ..., "train/<name>": ...}; then reset."""
        if self.sums is None:
            return {}
        totals = ctx.all_reduce(self.sums.clone()).tolist()
        n = self.count * ctx.world
        out = {"train/loss": totals[0] / n}
        for name, total in zip(self.names or [], totals[1:]):
            out[name if "/" in name else f"train/{name}"] = total / n
        self.sums, self.count = None, 0
        return out


@torch.no_grad()
def evaluate(task: TrainTask, module: torch.nn.Module, loader: DataLoader, ctx: WorkerContext,
             non_blocking: bool = False) -> dict[str, float]:
    """Every rank evaluates its share; sums and counts are all-reduced (one collective)."""
    was_training = module.training
    module.eval()
    sums: dict[str, list] = {}
    try:
        for batch in loader:
            for name, value in task.eval_step(module, to_device(batch, ctx.device, non_blocking)).items():
                total, count = value if isinstance(value, (tuple, list)) else (value, None)
                total = _scalar(total, ctx.device)
                count = None if count is None else _scalar(count, ctx.device)
                if name not in sums:
                    sums[name] = [total, count]
                else:
                    sums[name][0] = sums[name][0] + total
                    if count is not None:
                        sums[name][1] = sums[name][1] + count
    finally:
        module.train(was_training)
    # A rank whose share is empty still joins: the names come from every rank.
    kinds = {}
    for part in ctx.all_gather({name: count is not None for name, (_, count) in sums.items()}):
        kinds.update(part)
    names = sorted(kinds)
    vec = torch.zeros(2 * len(names), dtype=torch.float64, device=ctx.device)
    for i, name in enumerate(names):
        if name in sums:
            vec[2 * i] = sums[name][0]
            if sums[name][1] is not None:
                vec[2 * i + 1] = sums[name][1]
    values = ctx.all_reduce(vec).tolist()
    out = {}
    for i, name in enumerate(names):
        total, count = values[2 * i], values[2 * i + 1]
        if not kinds[name]:
            out[name] = total
        elif count > 0:
            out[name] = total / count
    return out


def improves(value: float, best: dict[str, Any] | None, mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best["value"] if mode == "max" else value < best["value"]


# -- the worker ---------------------------------------------------------------------------------

def _ray_context(storage: Storage) -> WorkerContext:
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
    """Ray Train's per-worker entry point; ``config = {"job": tasks.pack_job(cfg)}``."""
    from sonosynth.trainers.tasks import unpack_job

    cfg, task_cls = unpack_job(config["job"])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(cfg.engine.cpus_per_worker)
    run(cfg, task_cls, _ray_context(open_storage(cfg.out, cfg.storage)))


def run(cfg, task_cls: type[TrainTask], ctx: WorkerContext) -> None:
    """Train ``task_cls`` on this rank (the process group is up); rank 0 writes summary.json."""
    import deepspeed

    from sonosynth.trainers.checkpoint import CheckpointStore
    from sonosynth.trainers.config import ds_config
    from sonosynth.trainers.optim import build_optimizer

    e = cfg.engine
    task = task_cls(cfg, ctx)
    train_set, eval_set = task.train_dataset(), task.eval_dataset()
    if e.best_metric and (eval_set is None or len(eval_set) == 0):
        raise ConfigError(f"engine.best_metric={e.best_metric} needs a validation set and the {cfg.task!r} task "
                          f"has none (its eval_dataset() is empty or None); set engine.best_metric=null to "
                          f"export the last step, or give the task a validation split")
    n = len(train_set)
    if n == 0:
        raise ValueError(f"the {cfg.task!r} task has no training examples")
    total = e.total_steps(n)
    module = task.module()
    optimizer, scheduler = build_optimizer(task.param_groups(module), cfg.optim, total)
    on_gpu = ctx.device.type == "cuda"
    ds = ds_config(e, cfg.optim, ctx.world, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, dist_init_required=False)
    store = CheckpointStore(ctx.storage, keep=e.keep_checkpoints)
    latest = store.latest()
    state = store.load(engine, latest, world=ctx.world).get("state", {}) if latest else {}
    start = latest["step"] if latest else 0
    if ctx.is_main and start:
        print(f"resuming from checkpoint step {start} of {total}", flush=True)
    state["resumed_from_step"] = start
    state["eval_examples"] = len(eval_set) if eval_set is not None else 0

    eval_loader = None
    if eval_set is not None and len(eval_set):
        eval_loader = make_loader(eval_set, ShareBatches(len(eval_set), e.seed, rank=ctx.rank, world=ctx.world,
                                                         batch=e.micro_batch),
                                  task.collate, workers=e.loader_workers, prefetch=e.prefetch, pin=on_gpu,
                                  persistent=True)
    tracker = _open_tracker(cfg, ctx)
    bar = None
    try:
        if ctx.is_main and start == 0:
            tracker.log_params(cfg.flat())
            tracker.log_params({"data.num_examples": n, "data.num_eval_examples": state["eval_examples"],
                                "engine.total_steps": total, "engine.global_batch": e.global_batch()})
            tracker.log_text(cfg.to_yaml(), "config.yaml")
            task.on_start(tracker)
        if start == 0 and eval_loader is not None:
            ctx.step = 0
            state["eval_start"] = evaluate(task, engine.module, eval_loader, ctx, on_gpu)
            _check_best_metric(cfg, state["eval_start"])
            if ctx.is_main:
                tracker.log_metrics(state["eval_start"], 0)
        train_loader = make_loader(train_set, StepBatches(n, e.seed, start=start, total=total, rank=ctx.rank,
                                                          world=ctx.world, micro_batch=e.micro_batch,
                                                          grad_accum=e.grad_accum),
                                   task.collate, workers=e.loader_workers, prefetch=e.prefetch, pin=on_gpu)
        bar = _progress(ctx, e.progress, total, start, type(task).__name__)
        perf = run_steps(cfg, ctx, task, engine, store, tracker, state, start, total, train_loader, eval_loader,
                         bar)
    except BaseException:
        if ctx.is_main:
            tracker.close("FAILED")
        raise
    finally:
        if bar is not None:
            bar.close()
    if ctx.is_main:
        _finish(cfg, ctx, task, engine, store, tracker, state, total, n, perf)
    ctx.barrier()


def _check_best_metric(cfg, metrics: dict[str, float]) -> None:
    name = cfg.engine.best_metric
    if name and name not in metrics:
        raise ConfigError(f"engine.best_metric={name} is not among the {cfg.task!r} task's evaluation metrics "
                          f"({', '.join(sorted(metrics)) or 'none'}); set it to one of them")


def _open_tracker(cfg, ctx: WorkerContext) -> Tracker:
    """Rank 0 opens (or, on resume, reopens) the job's single MLflow run; others get a no-op."""
    record = {}
    if ctx.is_main and ctx.storage.exists(TRACKING_RECORD):
        record = json.loads(ctx.storage.get_text(TRACKING_RECORD))
    tracker = Tracker(cfg.tracking, enabled=ctx.is_main, offline_dir=offline_dir_for(cfg.out),
                      experiment=cfg.experiment, run_id=record.get("run_id"))
    tags = {"sonosynth.stage": cfg.experiment, "sonosynth.task": cfg.task, "sonosynth.out": cfg.out}
    if ctx.is_main and tracker.start(tags=tags):
        record.update(run_id=tracker.run_id, uri=tracker.uri)
        ctx.storage.put_text(TRACKING_RECORD, json.dumps(record))
    return tracker


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def run_steps(cfg, ctx: WorkerContext, task: TrainTask, engine, store, tracker: Tracker, state: dict[str, Any],
              start: int, total: int, train_loader: DataLoader, eval_loader: DataLoader | None,
              bar) -> dict[str, Any]:
    """Steps ``start`` to ``total``; returns this session's throughput after its first log window."""
    e = cfg.engine
    on_gpu = ctx.device.type == "cuda"
    meter = TrainMeter(ctx.device)
    batches = iter(train_loader)
    t_last, step_last = time.perf_counter(), start
    t_warm, step_warm = t_last, start
    for step in range(start, total):
        ctx.step = step
        engine.train()
        for micro in range(e.grad_accum):
            batch = to_device(next(batches), ctx.device, on_gpu)
            torch.manual_seed(derive_seed(e.seed, "global", step, micro, ctx.rank))  # dropout & co.
            generator = torch.Generator().manual_seed(noise_seed(e.seed, step, micro, ctx.rank))
            loss, metrics = split_output(engine(batch, generator))
            engine.backward(loss)
            engine.step()
            meter.add(loss, metrics)
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % e.log_every == 0 or done == total:
            logged = meter.reduce(ctx)
            now = time.perf_counter()
            rate = (done - step_last) / max(now - t_last, 1e-9)
            logged.update({"train/lr": engine.get_lr()[0], "perf/steps_per_s": rate,
                           "perf/samples_per_s": rate * e.global_batch()})
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                logged["train/grad_norm"] = float(grad_norm)
            if ctx.is_main:
                tracker.log_metrics(logged, done)
                state.setdefault("loss_first", logged["train/loss"])
                state["loss_last"] = logged["train/loss"]
            if step_warm == start and done < total:
                t_warm, step_warm = now, done  # throughput is measured after the first window
            t_last, step_last = now, done
        if eval_loader is not None and e.evaluates_at(done, total):
            ctx.step = done
            state["eval_last"] = evaluate(task, engine.module, eval_loader, ctx, on_gpu)
            _check_best_metric(cfg, state["eval_last"])
            if ctx.is_main:
                tracker.log_metrics(state["eval_last"], done)
            _keep_best(cfg, ctx, engine, store, state, done)
        if done % e.checkpoint_every == 0 or done == total:
            store.save(engine, done, {"state": state}, rank=ctx.rank, world=ctx.world)
            if ctx.is_main and e.best_metric:
                current = {state["best"]["step"]} if state.get("best") else set()
                store.prune_best(store.best_steps_in_use() | current)
    if total <= start:
        return {}
    seconds = time.perf_counter() - t_warm
    steps = total - step_warm
    peak, kind = _peak_memory(ctx.device)
    rate = steps / max(seconds, 1e-9)
    return {"steps_per_s": rate, "samples_per_s": rate * e.global_batch(), "measured_steps": steps,
            "peak_memory_mb": peak, "memory_kind": kind}


def _keep_best(cfg, ctx: WorkerContext, engine, store, state: dict[str, Any], done: int) -> None:
    """After an evaluation: when ``best_metric`` improved, remember it and keep the weights."""
    e = cfg.engine
    if not e.best_metric:
        return
    value = state["eval_last"][e.best_metric]
    if improves(value, state.get("best"), e.best_mode):
        state["best"] = {"metric": e.best_metric, "mode": e.best_mode, "value": value, "step": done,
                         "metrics": dict(state["eval_last"])}
        if ctx.is_main:
            store.save_best(engine.module, done)


def _finish(cfg, ctx: WorkerContext, task: TrainTask, engine, store, tracker: Tracker,
            state: dict[str, Any], total: int, n: int, perf: dict[str, Any]) -> None:
    from sonosynth.trainers.config import job_fingerprint

    best = state.get("best")
    if best:
        store.load_best(engine.module, best["step"])
        store.prune_best({best["step"]})
    with tempfile.TemporaryDirectory(prefix="sonosynth-export-") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        lineage = dict(task.export(engine.module, folder, tracker) or {})
        lineage["training"] = {
            "stage": cfg.stage_name(), "task": cfg.task, "job": job_fingerprint(cfg), "steps": total,
            "exported_step": best["step"] if best else total,
            "selected_by": {k: best[k] for k in ("metric", "mode", "value")} if best else "last step",
        }
        lineage_text = json.dumps(lineage, indent=1, default=str)
        (folder / "lineage.json").write_text(lineage_text)
        (folder / "config.yaml").write_text(cfg.to_yaml())
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                ctx.storage.put_file(f"model/{path.relative_to(folder)}", path)
        tracker.log_artifact(folder, "model")
        tracker.log_text(lineage_text, "lineage.json")
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
    if best:
        tracker.log_metrics({f"best/{best['metric']}": best["value"]}, best["step"])
    summary = {
        "job": job_fingerprint(cfg), "task": cfg.task, "steps": total, "examples": n,
        "eval_examples": state.get("eval_examples", 0), "workers": ctx.world,
        "resumed_from_step": state.get("resumed_from_step", 0),
        "loss_first": state.get("loss_first"), "loss_last": state.get("loss_last"),
        "eval_start": state.get("eval_start", {}), "eval_end": state.get("eval_last", {}),
        "best": {k: best[k] for k in ("metric", "mode", "value", "step", "metrics")} if best else None,
        "perf": perf or None,
        "model": ctx.storage.url("model"), "lineage": lineage,
        "mlflow": {"uri": tracker.uri if tracker.enabled else None, "run_id": tracker.run_id,
                   "registered_model": name if version else None, "version": version,
                   "offline": tracker.offline},
    }
    ctx.storage.put_text(SUMMARY, json.dumps(summary, indent=1, default=str))
    tracker.log_text(json.dumps(summary, indent=1, default=str), "summary.json")
    tracker.close("FINISHED")
