"""The sweep recipe: one stage over a grid of labelled overrides, replicated over seeds.

A *cell* is one combination of the grid's labels (``n_real-4__arm-real``); a *run* is a cell at
one seed (``n_real-4__arm-real__seed-0``), with its own output folder ``OUT/<run>``. Every run of
a seed sets each of ``seed_keys`` to that seed, so all arms of one seed draw the same real subset
(paired), and a smaller count takes a subset of a larger one (nested): the mix's seeded choice
depends on ``data.seed`` and the count only (``datasets.mix.choose``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import model_validator

from sonosynth.infra.cluster import RayConfig
from sonosynth.infra.config import Config
from sonosynth.infra.storage import StorageConfig
from sonosynth.infra.tracking import TrackingConfig

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
SEED = "seed"
"""The column that holds a run's seed in the runs table."""


class SweepEvaluateConfig(Config):
    """How each run's model is scored (the ``evaluate`` stage), on one fixed set for the whole sweep."""

    dataset: str
    """Dataset with the ground truth, the same for every run: a held-out cohort or a test split that
    no run trained or selected checkpoints on, e.g. ${prepare.heads.out}."""
    split: str | None = "test"
    """Split to score (null: every sample)."""
    set: dict[str, Any] = {}
    """Further evaluate fields, dotted keys (e.g. {box_draws: 5})."""


class SweepConfig(Config):
    """``sonosynth sweep``: one stage over a grid of overrides and seeds; tables with intervals from MLflow."""

    stage: str
    """The stage every run runs, e.g. train-sam or train-classifier."""
    recipe: str
    """Base recipe of every run (name or YAML path)."""
    out: str = "runs/sweep"
    """Folder or s3:// prefix: one subfolder per run, the tables (results.md, runs.csv, ...) and the plot."""
    grid: dict[str, dict[str, dict[str, Any]]]
    """Axis -> label -> overrides, e.g. {n_real: {'5': {data.sources.real.count: 5}}, arm: {real: {}, ...}}.
    Values may use ${prepare.SECTION.out}, ${prepare.SECTION.outputs.NAME} (the prepare pipeline's
    sections), ${out}, ${shared_data} and ${env:NAME}."""
    exclude: list[dict[str, str]] = []
    """Cells to leave out, by their labels, e.g. [{n_real: '500', arm: synthetic}]."""
    set: dict[str, Any] = {}
    """Overrides for every run (dotted keys)."""
    seeds: list[int] = []
    """Replicates: every cell runs once per seed, with each of seed_keys set to it. Empty: once, with the
    recipe's own seeds (no intervals then)."""
    seed_keys: list[str] = ["data.seed", "engine.seed"]
    """The fields a seed sets: data.seed draws the real subset (the same for every arm of a seed, nested
    across counts), engine.seed the initialisation and batch order."""
    baseline: dict[str, str] = {}
    """The arm every other is compared with, paired by seed: {axis: label}, e.g. {arm: real}. Empty: no
    differences table."""
    evaluate: SweepEvaluateConfig | None = None
    """Score each run's model with the evaluate stage (null: the training figures only)."""
    metrics: list[str] = []
    """Table columns: MLflow metric names prefixed 'train:' or 'eval:' (empty: every final metric). The
    first is the plotted one."""
    reference_metric: str | None = None
    """A figure that does not depend on the trained model, shown as the reference line and row, e.g.
    eval:box_baseline_dice_mean (the box prompt alone) for train-sam."""
    plot_axis: str | None = None
    """The axis on the plot's x (numeric labels, e.g. n_real). Null: the first axis whose labels are all
    numbers (no plot when none is)."""
    prepare: str | None = None
    """A pipeline recipe run first, into OUT/prepare (e.g. ingest the cohorts, train a LoRA, generate the
    synthetic pairs); ${prepare.SECTION.out} and ${prepare.SECTION.outputs.NAME} in the grid, set and
    evaluate are what its sections wrote. Resumable like any pipeline."""
    prepare_set: dict[str, Any] = {}
    """Overrides of the prepare pipeline (SECTION.key: value)."""
    parallel: int | Literal["auto"] = 1
    """Runs at once: 1 runs them one after another in this process; N > 1 runs them as Ray tasks on the
    cluster (each run's training workers take its resources); auto: as many as the cluster's CPUs and
    GPUs hold at the first run's size."""
    register_models: bool = False
    """Register every run's model in the MLflow model registry (default: no; a sweep's models are the
    comparison, not candidates for promotion)."""
    retries: int = 1
    """Times a parallel run is retried after its process or node is lost (it resumes from its checkpoint)."""
    ray: RayConfig = RayConfig()
    """The Ray cluster of parallel runs (null address: $RAY_ADDRESS, else a local Ray)."""
    tracking: TrackingConfig = TrackingConfig()
    """Where every run is tracked (the uri overrides the runs' recipes) and the tables are read from."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the output storage."""

    @model_validator(mode="before")
    @classmethod
    def _labels_are_text(cls, data: Any) -> Any:
        """YAML reads labels like 5 or 0.5 as numbers; they name cells, so they are text."""
        if isinstance(data, dict) and isinstance(data.get("grid"), dict):
            data = {**data, "grid": {a: {str(k): v for k, v in (labels or {}).items()}
                                     for a, labels in data["grid"].items()}}
        for key in ("exclude",):
            if isinstance(data, dict) and isinstance(data.get(key), list):
                data = {**data, key: [{k: str(v) for k, v in ex.items()} for ex in data[key]]}
        if isinstance(data, dict) and isinstance(data.get("baseline"), dict):
            data = {**data, "baseline": {k: str(v) for k, v in data["baseline"].items()}}
        return data

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        if not self.grid or any(not labels for labels in self.grid.values()):
            raise ValueError("grid needs at least one axis with at least one label")
        if SEED in self.grid:
            raise ValueError(f"the grid has an axis named {SEED!r}; replicates go in seeds: [...], rename the axis")
        for cell in self.exclude:
            unknown = set(cell) - set(self.grid)
            if unknown:
                raise ValueError(f"exclude names axes {sorted(unknown)} that the grid lacks; axes: {list(self.grid)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed; give each once")
        if self.baseline:
            if len(self.baseline) != 1:
                raise ValueError(f"baseline names {len(self.baseline)} axes; name one, e.g. {{arm: real}}")
            (axis, label), = self.baseline.items()
            if axis not in self.grid or label not in self.grid[axis]:
                raise ValueError(f"baseline {axis}={label} is not in the grid; axes and labels: "
                                 f"{ {a: list(labels) for a, labels in self.grid.items()} }")
        if self.plot_axis is not None and self.plot_axis not in self.grid:
            raise ValueError(f"plot_axis {self.plot_axis!r} is not an axis of the grid: {list(self.grid)}")
        if isinstance(self.parallel, int) and self.parallel < 1:
            raise ValueError(f"parallel {self.parallel}: give 1 (one run at a time), N > 1 or auto")
        for metric in [*self.metrics, *([self.reference_metric] if self.reference_metric else [])]:
            if not metric.startswith(("train:", "eval:")):
                raise ValueError(f"metric {metric!r} needs its run's prefix: train:{metric} or eval:{metric}")
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

    def runs(self) -> list["RunSpec"]:
        """Every cell at every seed, seed-major: the first seed's whole grid comes first, so a sweep
        cut short still has complete, paired replicates."""
        seeds: list[int | None] = list(self.seeds) or [None]
        return [RunSpec(cell, seed) for seed in seeds for cell in self.cells()]

    @property
    def x_axis(self) -> str | None:
        """The plot's x axis: ``plot_axis``, else the first axis with numeric labels."""
        if self.plot_axis:
            return self.plot_axis
        return next((a for a, labels in self.grid.items() if all(_is_number(v) for v in labels)), None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cell_name(cell: dict[str, str]) -> str:
    return "__".join(f"{_UNSAFE.sub('_', a)}-{_UNSAFE.sub('_', str(v))}" for a, v in cell.items())


@dataclass(frozen=True)
class RunSpec:
    """One cell at one seed (None: the recipe's own seeds)."""

    cell: dict[str, str]
    seed: int | None

    @property
    def name(self) -> str:
        """The run's folder under OUT: the cell's name, then ``__seed-N``."""
        return cell_name(self.cell) + (f"__{SEED}-{self.seed}" if self.seed is not None else "")

    def labels(self) -> dict[str, Any]:
        return {**self.cell, **({SEED: self.seed} if self.seed is not None else {})}
