"""Runs of a sweep at once, as Ray tasks on the cluster.

A training run's task is light (it holds no CPU): it starts the run's stage, whose training workers
ask Ray for the run's resources, so Ray places each run's workers where they fit, on any node (a
stage without training workers holds one CPU in its task, where its work runs). At most
``parallel`` runs are in flight; ``auto`` fits as many as the cluster's CPUs and GPUs hold at the
first run's size. A task whose process or node is lost is retried (``retries``) and its stage
resumes from its own checkpoint, which is what makes the retry safe.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from sonosynth.infra.config import Config
from sonosynth.launch.sweep.cells import cell_config, run_one
from sonosynth.launch.sweep.config import RunSpec, SweepConfig

log = logging.getLogger(__name__)


def run_resources(cfg: Config) -> dict[str, float]:
    """What one run's workers ask Ray for: engine.workers x engine.cpus_per_worker CPUs, and a GPU
    per worker when its device is gpu (1 CPU for a stage without an engine)."""
    engine = getattr(cfg, "engine", None)
    if engine is None:
        return {"CPU": 1.0}
    workers = getattr(engine, "workers", 1)
    out = {"CPU": float(workers * getattr(engine, "cpus_per_worker", 1))}
    if getattr(engine, "device", "cpu") == "gpu":
        out["GPU"] = float(workers)
    return out


def task_cpus(cfg: Config) -> float:
    """CPUs the run's task itself holds: none when the stage starts training workers of its own (they
    hold the run's resources), else one (the stage's work runs in the task, e.g. evaluate)."""
    return 0.0 if getattr(cfg, "engine", None) is not None else 1.0


def fit_parallel(cluster: dict[str, float], need: dict[str, float], runs: int) -> int:
    """How many runs of size ``need`` the cluster holds at once (at least 1, at most ``runs``)."""
    fits = [math.floor(cluster.get(kind, 0.0) / amount) for kind, amount in need.items() if amount > 0]
    return max(1, min([runs, *fits]))


def how_many(sweep: SweepConfig, specs: list[RunSpec]) -> tuple[int, dict[str, float], float]:
    """``sweep.parallel`` as a number (``auto`` from the cluster's resources), one run's resources and
    the CPUs its task holds."""
    import ray

    from sonosynth.launch.stages import get_stage

    first = cell_config(sweep, specs[0], get_stage(sweep.stage).config_class)
    need = run_resources(first)
    if sweep.parallel != "auto":
        return min(int(sweep.parallel), len(specs)), need, task_cpus(first)
    return fit_parallel(ray.cluster_resources(), need, len(specs)), need, task_cpus(first)


def run_parallel(sweep: SweepConfig, specs: list[RunSpec], on_done: Callable[[dict[str, Any]], None]) -> None:
    """Every spec as a Ray task, at most ``how_many`` at once; ``on_done(row)`` as each ends."""
    import ray

    from sonosynth.infra.cluster import connect

    where = connect(sweep.ray)
    width, need, cpus = how_many(sweep, specs)
    log.warning("sweep: %d runs, %d at once on %s (each run's workers: %s)", len(specs), width, where,
                ", ".join(f"{v:g} {k}" for k, v in need.items()))
    task = ray.remote(run_one).options(num_cpus=cpus, max_retries=sweep.retries, name="sweep-run")
    queue, pending = list(specs), {}
    while queue or pending:
        while queue and len(pending) < width:
            spec = queue.pop(0)
            pending[task.remote(sweep, spec)] = spec
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            spec = pending.pop(ref)
            try:
                row = ray.get(ref)
            except (ray.exceptions.RayError, OSError) as err:  # lost after its retries
                row = {**spec.labels(), "run": spec.name, "error": f"lost: {str(err).strip().splitlines()[0]}"}
            on_done(row)
