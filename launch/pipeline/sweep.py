"""``sonosynth sweep``: run a grid of one stage's recipe, then write the table from MLflow.

A sweep recipe names a stage, a base recipe and a grid: each axis maps labels to overrides
(dotted keys, as ``--set`` takes them). Every combination is a cell with its own output
folder ``OUT/<axis>-<label>__...``; a cell is run by the stage itself, so a finished cell is
skipped and a killed one resumes. With ``evaluate``, each cell's model is scored by the
``evaluate`` stage. The table (``results.csv``, ``results.md``) is read back from the MLflow
runs the cells logged, so it shows what the tracking server holds.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
from typing import Any

from pydantic import model_validator

from sonosynth.infra.config import Config, ConfigError, set_dotted
from sonosynth.infra.secrets import redact_obj
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import StorageConfig, open_storage
from sonosynth.infra.tracking import TrackingConfig
from sonosynth.launch.pipeline.child import child_config
from sonosynth.launch.pipeline.tables import to_csv, to_markdown

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class SweepEvaluateConfig(Config):
    """How each cell's model is scored (the ``evaluate`` stage)."""

    dataset: str
    """Dataset with the ground truth (never the one checkpoints were selected on)."""
    split: str | None = "test"
    """Split to score (null: every sample)."""
    set: dict[str, Any] = {}
    """Further evaluate fields, dotted keys (e.g. {box_draws: 5})."""


class SweepConfig(Config):
    """``sonosynth sweep``: one stage over a grid of overrides, and the table of results."""

    stage: str
    """The stage every cell runs, e.g. train-sam or train-classifier."""
    recipe: str
    """Base recipe of every cell (name or YAML path)."""
    out: str = "runs/sweep"
    """Folder or s3:// prefix: one subfolder per cell, results.csv, results.md, summary.json."""
    grid: dict[str, dict[str, dict[str, Any]]]
    """Axis -> label -> overrides, e.g. {n_real: {'5': {data.sources: [...]}, '10': {...}}}."""
    exclude: list[dict[str, str]] = []
    """Cells to leave out, by their labels, e.g. [{n_real: '500', data: synthetic}]."""
    set: dict[str, Any] = {}
    """Overrides for every cell (dotted keys)."""
    evaluate: SweepEvaluateConfig | None = None
    """Score each cell's model with the evaluate stage (null: the training figures only)."""
    metrics: list[str] = []
    """Table columns: MLflow metric names, prefixed 'train:' or 'eval:' (empty: every final metric)."""
    tracking: TrackingConfig = TrackingConfig()
    """Where every cell is tracked (the uri overrides the cells' recipes) and the table is read."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the output storage."""

    @model_validator(mode="before")
    @classmethod
    def _labels_are_text(cls, data: Any) -> Any:
        """YAML reads labels like 5 or 0.5 as numbers; they name cells, so they are text."""
        if isinstance(data, dict) and isinstance(data.get("grid"), dict):
            data = {**data, "grid": {a: {str(k): v for k, v in (labels or {}).items()}
                                     for a, labels in data["grid"].items()}}
        if isinstance(data, dict) and isinstance(data.get("exclude"), list):
            data = {**data, "exclude": [{k: str(v) for k, v in ex.items()} for ex in data["exclude"]]}
        return data

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        if not self.grid or any(not labels for labels in self.grid.values()):
            raise ValueError("grid needs at least one axis with at least one label")
        for cell in self.exclude:
            unknown = set(cell) - set(self.grid)
            if unknown:
                raise ValueError(f"exclude names axes {sorted(unknown)} that the grid lacks; axes: {list(self.grid)}")
        return self

    def cells(self) -> list[dict[str, str]]:
        """Every combination of labels, in grid order, less the excluded ones."""
        axes = list(self.grid)
        out = []
        for labels in itertools.product(*(list(self.grid[a]) for a in axes)):
            cell = dict(zip(axes, labels))
            if not any(all(cell[k] == str(v) for k, v in ex.items()) for ex in self.exclude):
                out.append(cell)
        return out


def cell_name(cell: dict[str, str]) -> str:
    return "__".join(f"{_UNSAFE.sub('_', a)}-{_UNSAFE.sub('_', str(v))}" for a, v in cell.items())


def cell_config(sweep: SweepConfig, cell: dict[str, str], config_class: type[Config]) -> Config:
    """The cell's stage config: base recipe < sweep-wide ``set`` < the cell's overrides."""
    from sonosynth.launch.recipes import find_recipe, load_recipe

    data = copy.deepcopy(load_recipe(find_recipe(sweep.recipe)))
    for key, value in sweep.set.items():
        set_dotted(data, key, copy.deepcopy(value))
    for axis, label in cell.items():
        for key, value in sweep.grid[axis][label].items():
            set_dotted(data, key, copy.deepcopy(value))
    own = data.get("tracking") or {}
    return child_config(config_class, data, out=f"{sweep.out.rstrip('/')}/{cell_name(cell)}",
                        tracking=_tracking(sweep, own.get("run_name") or cell_name(cell)),
                        source=f"sweep {sweep.recipe} cell {cell_name(cell)}")


def _eval_config(sweep: SweepConfig, model: str, cell: dict[str, str], config_class: type[Config]) -> Config:
    ev = sweep.evaluate
    data: dict[str, Any] = {"dataset": ev.dataset, "split": ev.split, "model": model}
    for key, value in ev.set.items():
        set_dotted(data, key, copy.deepcopy(value))
    return child_config(config_class, data, out=f"{sweep.out.rstrip('/')}/{cell_name(cell)}/eval",
                        tracking=_tracking(sweep, f"{cell_name(cell)}-eval"),
                        source=f"sweep evaluate, cell {cell_name(cell)}")


def _tracking(sweep: SweepConfig, run_name: str) -> dict[str, Any]:
    return {"run_name": run_name, **({"uri": sweep.tracking.uri} if sweep.tracking.uri else {})}


def _final_metrics(uri: str, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    from mlflow import MlflowClient

    return dict(MlflowClient(uri).get_run(run_id).data.metrics)


def run(cfg: SweepConfig) -> Report:
    """Run every cell (skipping finished ones), then read the table back from MLflow."""
    from sonosynth.launch.stages import get_stage

    stage, evaluate = get_stage(cfg.stage), get_stage("evaluate") if cfg.evaluate else None
    cells = cfg.cells()
    rows, failures = [], {}
    for i, cell in enumerate(cells, 1):
        name = cell_name(cell)
        log.warning("sweep cell %d/%d: %s", i, len(cells), name)
        row: dict[str, Any] = {**cell, "cell": name}
        try:
            cell_cfg = cell_config(cfg, cell, stage.config_class)
            trained = stage.run(cell_cfg)
            row["train_run"] = trained.tracking.get("run_id")
            row["train_uri"] = cell_cfg.tracking.resolved_uri()  # the report's URI has its password masked
            if evaluate is not None:
                eval_cfg = _eval_config(cfg, trained.outputs["model"], cell, evaluate.config_class)
                scored = evaluate.run(eval_cfg)
                row["eval_run"] = scored.tracking.get("run_id")
                row["eval_uri"] = eval_cfg.tracking.resolved_uri()
        except (StageFailed, ConfigError) as err:
            failures[name] = str(err).splitlines()[0]
            log.error("sweep cell %s failed: %s", name, failures[name])
        rows.append(row)
    table = results_table(cfg, rows)
    storage = open_storage(cfg.out, cfg.storage)
    storage.put_text("results.csv", to_csv(table))
    storage.put_text("results.md", to_markdown(table))
    storage.put_text("summary.json", json.dumps(redact_obj({"cells": rows, "failed": failures}), indent=1, default=str))
    out = cfg.out.rstrip("/")
    text = f"sweep of {cfg.stage} over {len(cells)} cells ({len(failures)} failed)\n" + to_markdown(table)
    return Report(stage="sweep", out=cfg.out, text=text, figures={"cells": len(cells), "failed": failures},
                  outputs={"table": f"{out}/results.md", "csv": f"{out}/results.csv"},
                  failed=f"{len(failures)} cells failed: {', '.join(failures)}; re-run to resume" if failures else None)


def results_table(cfg: SweepConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell: its labels, then the metrics its MLflow runs hold."""
    table = []
    for row in rows:
        metrics = {f"train:{k}": v for k, v in _final_metrics(row.get("train_uri"), row.get("train_run")).items()}
        metrics.update({f"eval:{k}": v for k, v in _final_metrics(row.get("eval_uri"), row.get("eval_run")).items()})
        columns = cfg.metrics or sorted(metrics)
        table.append({**{a: row[a] for a in cfg.grid}, **{c: metrics.get(c) for c in columns}})
    return table
