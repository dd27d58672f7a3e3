"""The training engine: what runs on every rank, for every task (LoRA, SAM, classifier).

``launcher.train(cfg)`` starts N Ray Train workers; each calls ``train_worker``, which builds
the job's ``TrainTask`` and hands it to ``run``. ``run`` takes the task's datasets
(``task_datasets``: no training examples, or a ``best_metric`` with no validation set to choose
on, is refused here), wraps the task's module with ``deepspeed.initialize`` on the process
group Ray made, restores the last complete checkpoint (weights, optimizer, schedule and the
``JobState``), builds the DataLoaders, and runs the steps of the ``Job``:

- data order: each rank's micro-batch indices are a pure function of (seed, step, micro,
  rank) (a seeded permutation per epoch), and every example is loaded with the global RNGs
  seeded from the same key, so a resumed job sees exactly the batches (augmentation
  included) an uninterrupted one would;
- noise: ``forward(batch, generator)`` gets a generator seeded per (seed, step, micro,
  rank), and the global torch RNG (dropout) is seeded per micro-batch too;
- buffers: after every optimizer step rank 0's floating-point buffers (BatchNorm's running
  statistics) are broadcast, as DDP does, so every rank evaluates the model rank 0 exports;
- metrics (``metrics``): the loss and the metrics ``forward`` returns are summed on the
  device and averaged across ranks (one all_reduce) every ``log_every`` steps;
- evaluation: every rank evaluates its share of the validation set at the start, every
  ``eval_every`` steps (default: at checkpoints) and at the end; the shares' sums and counts
  are combined (one collective) and the task's ``finalize_metrics`` finishes them; the best
  evaluation by ``best_metric`` keeps its weights;
- checkpoints every ``checkpoint_every`` steps; at the end rank 0 exports the best (or the
  last) weights through the task, logs config, lineage and summary, and registers the model;
- skipped data: what the task's readers left out under ``reader.on_error: skip``
  (``task.data_skipped()``, every rank's combined by ``job_skipped``) is logged at the end as
  ``data/skipped/<reason>`` and in summary.json's ``skipped`` ({} when nothing was).
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from sonosynth.infra.config import ConfigError
from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.secrets import redact
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.storage import Storage, open_storage
from sonosynth.infra.tracking import Tracker
from sonosynth.trainers.batching import ShareBatches, StepBatches, make_loader, noise_seed, to_device
from sonosynth.trainers.checkpoint import CheckpointStore
from sonosynth.trainers.metrics import Best, TrainMeter, evaluate, improves, split_output
from sonosynth.trainers.task import TrainTask, WorkerContext

TRACKING_RECORD = "tracking.json"
SUMMARY = "summary.json"


@dataclass
class JobState:
    """What a job carries from step to step and across a resume (every checkpoint saves it)."""

    resumed_from_step: int = 0
    eval_examples: int = 0
    eval_start: dict[str, float] = field(default_factory=dict)
    eval_last: dict[str, float] = field(default_factory=dict)
    """The latest evaluation's metrics."""
    best: Best | None = None
    loss_first: float | None = None
    loss_last: float | None = None

    @classmethod
    def from_checkpoint(cls, client_state: dict[str, Any]) -> "JobState":
        saved = client_state.get("state") or {}
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def to_checkpoint(self) -> dict[str, Any]:
        return {"state": asdict(self)}


@dataclass
class Job:
    """One rank's job once it is set up: what its steps, evaluations and end need."""

    cfg: Any
    ctx: WorkerContext
    task: TrainTask
    engine: Any
    """The DeepSpeed engine around the task's module."""
    store: CheckpointStore
    tracker: Tracker
    state: JobState
    examples: int
    """Training examples."""
    total: int
    """Steps the job trains for."""
    eval_loader: DataLoader | None = None
    train_loader: DataLoader | None = None
    bar: Any = None
    """Rank 0's progress bar, or None."""

    @property
    def on_gpu(self) -> bool:
        return self.ctx.device.type == "cuda"


def _ray_context(storage: Storage) -> WorkerContext:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                         ray.train.torch.get_device(), storage)


def _progress(ctx: WorkerContext, enabled: bool, total: int, start: int, desc: str, counter: Any = None):
    """Rank 0's steps: to the driver's bar through ``counter`` (``infra/progress``), or, for a job
    run in this process without Ray, to a bar here."""
    if not (enabled and ctx.is_main):
        return None
    from sonosynth.infra.progress import Progress, StepReporter

    if counter is not None:
        return StepReporter(counter, total, start)
    return Progress(total, desc, "step", initial=start)


def use_current_all_gather() -> None:
    """DeepSpeed 0.19 gathers ZeRO partitions with ``torch.distributed.all_gather_into_tensor``, which
    torch 2.13 deprecates (a FutureWarning on every rank of every job) for ``all_gather_single``: the
    same arguments and result. Hand DeepSpeed's torch backend the current name before it is built."""
    import torch.distributed as dist
    from deepspeed.comm.torch import TorchBackend

    if hasattr(dist, "all_gather_single"):
        TorchBackend.get_all_gather_function = classmethod(lambda cls: dist.all_gather_single)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point; ``config = {"job": tasks.pack_job(cfg), "progress": counter}``."""
    from sonosynth.trainers.tasks import unpack_job

    cfg, task_cls = unpack_job(config["job"])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(cfg.engine.cpus_per_worker)
    run(cfg, task_cls, _ray_context(open_storage(cfg.out, cfg.storage)), counter=config.get("progress"))


def task_datasets(cfg, task: TrainTask) -> tuple[Dataset, Dataset | None]:
    """The task's training set and validation set (None when it has none or an empty one). Refused:
    an empty training set, and an ``engine.best_metric`` with no validation set to choose on."""
    train_set, eval_set = task.train_dataset(), task.eval_dataset()
    if eval_set is not None and len(eval_set) == 0:
        eval_set = None
    if cfg.engine.best_metric and eval_set is None:
        raise ConfigError(f"engine.best_metric={cfg.engine.best_metric} chooses the exported checkpoint on the "
                          f"validation set, and the {cfg.task!r} task's is empty (its eval_dataset() has no "
                          f"examples); give the task's data a validation split (e.g. ingest with splits.val > 0, "
                          f"or point its validation at another dataset), or set engine.best_metric=null to "
                          f"export the last step")
    if len(train_set) == 0:
        raise ValueError(f"the {cfg.task!r} task has no training examples")
    return train_set, eval_set


def run(cfg, task_cls: type[TrainTask], ctx: WorkerContext, counter: Any = None) -> None:
    """Train ``task_cls`` on this rank (the process group is up); rank 0 writes summary.json and
    reports its steps to ``counter`` (the driver's progress bar) when given."""
    import deepspeed

    use_current_all_gather()
    from sonosynth.trainers.config import ds_config
    from sonosynth.trainers.optim import build_optimizer

    e = cfg.engine
    task = task_cls(cfg, ctx)
    train_set, eval_set = task_datasets(cfg, task)
    opened = task.data_skipped()
    total = e.total_steps(len(train_set))
    module = task.module()
    optimizer, scheduler = build_optimizer(task.param_groups(module), cfg.optim, total)
    on_gpu = ctx.device.type == "cuda"
    ds = ds_config(e, cfg.optim, ctx.world, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, dist_init_required=False)
    store = CheckpointStore(ctx.storage, keep=e.keep_checkpoints)
    latest = store.latest()
    state = JobState.from_checkpoint(store.load(engine, latest, world=ctx.world)) if latest else JobState()
    start = latest["step"] if latest else 0
    if ctx.is_main and start:
        print(f"resuming from checkpoint step {start} of {total}", flush=True)
    state.resumed_from_step = start
    state.eval_examples = len(eval_set) if eval_set is not None else 0
    job = Job(cfg, ctx, task, engine, store, _open_tracker(cfg, ctx), state, len(train_set), total)
    if eval_set is not None:
        job.eval_loader = make_loader(eval_set, ShareBatches(len(eval_set), e.seed, rank=ctx.rank, world=ctx.world,
                                                             batch=e.micro_batch),
                                      task.collate, workers=e.loader_workers, prefetch=e.prefetch, pin=on_gpu,
                                      persistent=True)
    try:
        if ctx.is_main and start == 0:
            _log_start(job)
        if start == 0 and job.eval_loader is not None:
            state.eval_start = evaluate_at(job, 0)
        job.train_loader = make_loader(train_set, StepBatches(len(train_set), e.seed, start=start, total=total,
                                                              rank=ctx.rank, world=ctx.world,
                                                              micro_batch=e.micro_batch, grad_accum=e.grad_accum),
                                       task.collate, workers=e.loader_workers, prefetch=e.prefetch, pin=on_gpu)
        job.bar = _progress(ctx, e.progress, total, start, cfg.stage_name(), counter)
        perf = run_steps(job, start)
    except BaseException:
        if ctx.is_main:
            job.tracker.close("FAILED")
        raise
    finally:
        if job.bar is not None:
            job.bar.close()
    skipped = job_skipped(ctx, opened, task.data_skipped())
    if ctx.is_main:
        _finish(job, perf, skipped)
    ctx.barrier()


def model_size(module: torch.nn.Module) -> dict[str, int]:
    """The model's parameters, and those the job trained (ZeRO 1/2 partition no parameters: whole counts)."""
    params = list(module.parameters())
    return {"parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad)}


def job_skipped(ctx: WorkerContext, opened: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """{reason: count} the job's readers skipped, from each rank's ``task.data_skipped()`` when its
    datasets were built (``opened``: every rank opens all the data, so the most any rank counted)
    and at the end (``now``: what each rank's reads skipped after that, added up)."""
    total: dict[str, int] = {}
    shares = ctx.all_gather((opened, {r: n - opened.get(r, 0) for r, n in now.items()}))
    for at_open, _ in shares:
        for reason, n in at_open.items():
            total[reason] = max(total.get(reason, 0), n)
    for _, later in shares:
        for reason, n in later.items():
            total[reason] = total.get(reason, 0) + n
    return {reason: n for reason, n in sorted(total.items()) if n}


def _log_start(job: Job) -> None:
    cfg, e = job.cfg, job.cfg.engine
    job.tracker.log_params(cfg.flat())
    job.tracker.log_params({"data.num_examples": job.examples, "data.num_eval_examples": job.state.eval_examples,
                            "engine.total_steps": job.total, "engine.global_batch": e.global_batch()})
    job.tracker.log_text(cfg.to_yaml(), "config.yaml")
    job.task.on_start(job.tracker)


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


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's floating-point buffers (BatchNorm's running statistics) copied to every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    torch.distributed.broadcast(flat, 0)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def run_steps(job: Job, start: int) -> dict[str, Any]:
    """Steps ``start`` to ``job.total``; returns this session's throughput after its first log window."""
    ctx, engine, state, e = job.ctx, job.engine, job.state, job.cfg.engine
    meter = TrainMeter(ctx.device)
    batches = iter(job.train_loader)
    t_last, step_last = time.perf_counter(), start
    t_warm, step_warm = t_last, start
    for step in range(start, job.total):
        ctx.step = step
        engine.train()
        for micro in range(e.grad_accum):
            batch = to_device(next(batches), ctx.device, job.on_gpu)
            torch.manual_seed(derive_seed(e.seed, "global", step, micro, ctx.rank))  # dropout & co.
            generator = torch.Generator().manual_seed(noise_seed(e.seed, step, micro, ctx.rank))
            loss, metrics = split_output(engine(batch, generator))
            engine.backward(loss)
            engine.step()
            meter.add(loss, metrics)
        broadcast_buffers(engine.module)
        done = step + 1
        if job.bar is not None:
            job.bar.update(1)
        if done % e.log_every == 0 or done == job.total:
            logged = meter.reduce(ctx)
            now = time.perf_counter()
            rate = (done - step_last) / max(now - t_last, 1e-9)
            logged.update({"train/lr": engine.get_lr()[0], "perf/steps_per_s": rate,
                           "perf/samples_per_s": rate * e.global_batch()})
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                logged["train/grad_norm"] = float(grad_norm)
            if ctx.is_main:
                job.tracker.log_metrics(logged, done)
                if state.loss_first is None:
                    state.loss_first = logged["train/loss"]
                state.loss_last = logged["train/loss"]
                if job.bar is not None:
                    job.bar.set_postfix(loss=f"{state.loss_last:.3g}")
            if step_warm == start and done < job.total:
                t_warm, step_warm = now, done  # throughput is measured after the first window
            t_last, step_last = now, done
        if job.eval_loader is not None and e.evaluates_at(done, job.total):
            state.eval_last = evaluate_at(job, done)
            _keep_best(job, done)
        if done % e.checkpoint_every == 0 or done == job.total:
            _save_checkpoint(job, done)
    if job.total <= start:
        return {}
    seconds = time.perf_counter() - t_warm
    steps = job.total - step_warm
    peak, kind = _peak_memory(ctx.device)
    rate = steps / max(seconds, 1e-9)
    return {"steps_per_s": rate, "samples_per_s": rate * e.global_batch(), "measured_steps": steps,
            "peak_memory_mb": peak, "memory_kind": kind}


def evaluate_at(job: Job, done: int) -> dict[str, float]:
    """The evaluation after ``done`` steps (every rank its share); rank 0 logs it."""
    job.ctx.step = done
    metrics = evaluate(job.task, job.engine.module, job.eval_loader, job.ctx, job.on_gpu)
    _check_best_metric(job.cfg, metrics)
    if job.ctx.is_main:
        job.tracker.log_metrics(metrics, done)
    return metrics


def _keep_best(job: Job, done: int) -> None:
    """After an evaluation: when ``best_metric`` improved, remember it and keep the weights."""
    e, state = job.cfg.engine, job.state
    if not e.best_metric:
        return
    value = state.eval_last[e.best_metric]
    if improves(value, state.best, e.best_mode):
        state.best = Best(metric=e.best_metric, mode=e.best_mode, value=value, step=done,
                          metrics=dict(state.eval_last))
        if job.ctx.is_main:
            job.store.save_best(job.engine.module, done)


def _save_checkpoint(job: Job, done: int) -> None:
    job.store.save(job.engine, done, job.state.to_checkpoint(), rank=job.ctx.rank, world=job.ctx.world)
    if job.ctx.is_main and job.cfg.engine.best_metric:
        current = {job.state.best["step"]} if job.state.best else set()
        job.store.prune_best(job.store.best_steps_in_use() | current)


def _finish(job: Job, perf: dict[str, Any], skipped: dict[str, int]) -> None:
    from sonosynth.trainers.config import job_fingerprint

    cfg, ctx, tracker, state = job.cfg, job.ctx, job.tracker, job.state
    best = state.best
    if best:
        job.store.load_best(job.engine.module, best["step"])
        job.store.prune_best({best["step"]})
    with tempfile.TemporaryDirectory(prefix="sonosynth-export-") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        lineage = dict(job.task.export(job.engine.module, folder, tracker) or {})
        lineage["training"] = {
            "stage": cfg.stage_name(), "task": cfg.task, "job": job_fingerprint(cfg), "steps": job.total,
            "exported_step": best["step"] if best else job.total,
            "selected_by": {k: best[k] for k in ("metric", "mode", "value")} if best else "last step",
        }
        lineage_text = json.dumps(lineage, indent=1, default=str)
        (folder / "lineage.json").write_text(lineage_text)
        (folder / "config.yaml").write_text(redact(cfg.to_yaml()))
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
    if skipped:
        tracker.log_metrics({f"data/skipped/{reason}": n for reason, n in skipped.items()}, job.total)
    summary = {
        "job": job_fingerprint(cfg), "task": cfg.task, "steps": job.total, "examples": job.examples,
        "eval_examples": state.eval_examples, "workers": ctx.world, "resumed_from_step": state.resumed_from_step,
        **model_size(job.engine.module),
        "loss_first": state.loss_first, "loss_last": state.loss_last,
        "eval_start": state.eval_start, "eval_end": state.eval_last,
        "best": dict(best) if best else None,
        "skipped": skipped,
        "perf": perf or None,
        "model": ctx.storage.url("model"), "lineage": lineage,
        "mlflow": {"uri": tracker.uri if tracker.enabled else None, "run_id": tracker.run_id,
                   "registered_model": name if version else None, "version": version,
                   "offline": tracker.offline},
    }
    ctx.storage.put_text(SUMMARY, json.dumps(summary, indent=1, default=str))
    tracker.log_text(json.dumps(summary, indent=1, default=str), "summary.json")
    tracker.close("FINISHED")
