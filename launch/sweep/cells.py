"""One run of a sweep: its stage config (base recipe < sweep ``set`` < the cell's overrides < its seed),
the stage, then ``evaluate`` on the sweep's fixed set. The same function runs in this process
(``parallel: 1``) and in a Ray task (``parallel: N``), so both give the same run."""

from __future__ import annotations

import copy
import os
import socket
import time
from typing import Any

from sonosynth.infra.config import Config, ConfigError, set_dotted
from sonosynth.infra.stage import StageFailed
from sonosynth.launch.pipeline.child import child_config
from sonosynth.launch.pipeline.expressions import KEEP, _builtin, _walk
from sonosynth.launch.sweep.config import RunSpec, SweepConfig

PREPARE = "prepare"
"""The prepare pipeline's folder under OUT, and its ${...} name."""


def prepare_dir(sweep: SweepConfig) -> str:
    return f"{sweep.out.rstrip('/')}/{PREPARE}"


def with_prepared(sweep: SweepConfig, sections: dict[str, dict[str, Any]]) -> SweepConfig:
    """``sweep`` with every ${prepare.SECTION.out} / ${prepare.SECTION.outputs.NAME} of its grid, set and
    evaluate filled in from the prepare pipeline's sections (its report's ``stages`` figures)."""

    def lookup(ref: str, path: str) -> Any:
        head, _, rest = ref.partition(".")
        if head != PREPARE or not rest:
            return KEEP
        section, _, field = rest.partition(".")
        if section not in sections:
            raise ConfigError(f"{path}: ${{{ref}}}: the prepare pipeline {sweep.prepare} has no section "
                              f"{section!r}; its sections: {', '.join(sections)}")
        value: Any = sections[section]
        for part in (field or "out").split("."):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"{path}: ${{{ref}}}: section {section} of {sweep.prepare} has no {field}; "
                                  f"use ${{prepare.{section}.out}} or ${{prepare.{section}.outputs.NAME}} "
                                  f"(outputs: {', '.join(sections[section].get('outputs') or {}) or 'none'})")
            value = value[part]
        return value

    update: dict[str, Any] = {"grid": _walk(sweep.grid, lookup, "grid"), "set": _walk(sweep.set, lookup, "set")}
    if sweep.evaluate is not None:
        update["evaluate"] = type(sweep.evaluate).model_validate(
            _walk(sweep.evaluate.model_dump(), lookup, "evaluate"))
    return sweep.model_copy(update=update)


def substitute(sweep: SweepConfig, node: Any, where: str) -> Any:
    """``node`` with ${out}, ${shared_data} and ${env:NAME} filled in (${prepare...} is filled in by
    ``with_prepared`` once the prepare pipeline ran)."""

    def lookup(ref: str, path: str) -> Any:
        if ref.partition(".")[0] == PREPARE:
            if not sweep.prepare:
                raise ConfigError(f"{where}{path}: ${{{ref}}} is used but the sweep has no prepare pipeline; "
                                  "set prepare: RECIPE or give the folder")
            raise ConfigError(f"{where}{path}: ${{{ref}}} is known once the prepare pipeline {sweep.prepare} ran; "
                              "run the sweep (it runs the pipeline first)")
        value = _builtin(ref, sweep.out.rstrip("/"))
        if value is KEEP:
            raise ConfigError(f"{where}{path}: unknown ${{{ref}}}; a sweep knows ${{prepare.SECTION.out}}, "
                              "${prepare.SECTION.outputs.NAME}, ${out}, ${shared_data} and ${env:NAME}")
        return value

    return _walk(node, lookup)


def _tracking(sweep: SweepConfig, run_name: str) -> dict[str, Any]:
    return {"run_name": run_name, "uri": sweep.tracking.resolved_uri(),
            **({} if sweep.register_models else {"registered_model": ""})}


def cell_config(sweep: SweepConfig, spec: RunSpec | dict[str, str], config_class: type[Config]) -> Config:
    """The run's stage config: base recipe < sweep-wide ``set`` < the cell's overrides < its seed."""
    from sonosynth.launch.recipes import find_recipe, load_recipe

    if isinstance(spec, dict):
        spec = RunSpec(spec, None)
    data = copy.deepcopy(load_recipe(find_recipe(sweep.recipe)))
    for key, value in substitute(sweep, sweep.set, "set").items():
        set_dotted(data, key, copy.deepcopy(value))
    for axis, label in spec.cell.items():
        for key, value in substitute(sweep, sweep.grid[axis][label], f"grid.{axis}.{label}").items():
            set_dotted(data, key, copy.deepcopy(value))
    if spec.seed is not None:
        for key in sweep.seed_keys:
            set_dotted(data, key, spec.seed)
    own = data.get("tracking") or {}
    return child_config(config_class, data, out=f"{sweep.out.rstrip('/')}/{spec.name}",
                        tracking=_tracking(sweep, own.get("run_name") or spec.name), progress=False,
                        source=f"sweep {sweep.recipe} run {spec.name}")


def eval_config(sweep: SweepConfig, model: str, spec: RunSpec, config_class: type[Config]) -> Config:
    ev = sweep.evaluate
    data: dict[str, Any] = {"dataset": substitute(sweep, ev.dataset, "evaluate.dataset"), "split": ev.split,
                            "model": model}
    for key, value in substitute(sweep, ev.set, "evaluate.set").items():
        set_dotted(data, key, copy.deepcopy(value))
    return child_config(config_class, data, out=f"{sweep.out.rstrip('/')}/{spec.name}/eval",
                        tracking=_tracking(sweep, f"{spec.name}-eval"), progress=False,
                        source=f"sweep evaluate, run {spec.name}")


def run_one(sweep: SweepConfig, spec: RunSpec) -> dict[str, Any]:
    """Train (or resume, or skip a finished) run, then score it; a row naming its MLflow runs, where
    and when it ran, and its error (the first line) when it failed."""
    from sonosynth.launch.stages import get_stage

    row: dict[str, Any] = {**spec.labels(), "run": spec.name, "host": socket.gethostname(), "pid": os.getpid(),
                           "node": _ray_node(), "start": time.time()}
    try:
        stage = get_stage(sweep.stage)
        cfg = cell_config(sweep, spec, stage.config_class)
        trained = stage.run(cfg)
        if trained.failed:
            raise StageFailed(trained.failed)
        row["train_run"] = trained.tracking.get("run_id")
        if sweep.evaluate is not None:
            evaluate = get_stage("evaluate")
            scored = evaluate.run(eval_config(sweep, trained.outputs["model"], spec, evaluate.config_class))
            if scored.failed:
                raise StageFailed(scored.failed)
            row["eval_run"] = scored.tracking.get("run_id")
    except (StageFailed, ConfigError) as err:
        row["error"] = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    row["end"] = time.time()
    return row


def _ray_node() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - where it ran is a note, never a reason to fail
        return None
