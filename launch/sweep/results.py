"""A sweep's tables and plot, from what MLflow holds for its runs.

- ``runs.csv``: one row per run (cell labels, seed, every metric column).
- ``results.csv`` / ``results.md``: one row per cell, each metric's mean over seeds with a 95%
  Student t interval (over seeds: images are a fixed set, seeds are the replicates), the reference
  figure (e.g. the box prompt alone), and the paired differences against the baseline arm
  (``differences.csv``), seed by seed.
- ``<metric>_vs_<axis>.png``: the first metric against the plot axis, one band per arm.

The same tables are logged to one MLflow run per sweep output (experiment ``sonosynth-sweep``).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sonosynth.infra.storage import Storage
from sonosynth.launch.pipeline.tables import to_csv
from sonosynth.launch.sweep.config import SEED, SweepConfig
from sonosynth.launch.sweep.stats import (SEEDS, Interval, cell_table, intervals_csv, intervals_markdown,
                                          paired_differences, t_interval)

EXPERIMENT = "sonosynth-sweep"
_FILE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Written:
    text: str
    figures: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)


def final_metrics(uri: str, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    from mlflow import MlflowClient

    return dict(MlflowClient(uri).get_run(run_id).data.metrics)


def gather_runs(cfg: SweepConfig, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One dict per run: its labels, seed, and ``train:``/``eval:`` metrics read from MLflow; and the
    metric columns (``cfg.metrics``, else every one found)."""
    uri = cfg.tracking.resolved_uri()
    runs, found = [], {}
    for row in rows:
        metrics = {f"train:{k}": v for k, v in final_metrics(uri, row.get("train_run")).items()}
        metrics.update({f"eval:{k}": v for k, v in final_metrics(uri, row.get("eval_run")).items()})
        found.update(dict.fromkeys(metrics))
        labels = {a: row[a] for a in cfg.grid}
        runs.append({**labels, **({SEED: row[SEED]} if SEED in row else {}), "run": row["run"], **metrics})
    columns = list(cfg.metrics) or sorted(found)
    return runs, columns


def _reference(cfg: SweepConfig, runs: list[dict[str, Any]]) -> Interval | None:
    if not cfg.reference_metric:
        return None
    return t_interval([r.get(cfg.reference_metric) for r in runs])


def results_markdown(cfg: SweepConfig, cells: list[dict], diffs: list[dict], reference: Interval | None,
                     plot: str | None) -> str:
    seeds = f"{len(cfg.seeds)} seeds ({', '.join(map(str, cfg.seeds))})" if cfg.seeds else "one run per cell"
    lines = [f"# Sweep of {cfg.stage} ({cfg.recipe})", "",
             f"{len(cells)} cells x {seeds}. Each figure is the mean over seeds with its 95% Student t "
             "interval over seeds (the evaluation set is fixed; the seeds draw the real subset, the "
             "initialisation and the batch order). '—': one seed, no interval.", ""]
    lines += [intervals_markdown(cells)]
    if reference is not None and reference.mean is not None:
        lines += [f"Reference: {cfg.reference_metric} = {reference.mean:.3f} over every run (it does not depend "
                  "on the trained model; a cell below it does worse than the reference).", ""]
    if diffs:
        (axis, label), = cfg.baseline.items()
        lines += [f"## Paired differences against {axis}={label}", "",
                  "Per seed, the cell minus the baseline cell of the same seed (the same real subset), then "
                  "the mean with its 95% paired t interval; (k/n > 0): the seeds where the cell was higher.",
                  "", intervals_markdown(diffs)]
    if plot:
        lines += [f"![{Path(plot).stem}]({plot})", ""]
    return "\n".join(lines)


def write_results(cfg: SweepConfig, rows: list[dict[str, Any]], storage: Storage) -> Written:
    """Read every run's metrics back from MLflow; write the tables and the plot; log them to MLflow."""
    runs, metrics = gather_runs(cfg, rows)
    axes = list(cfg.grid)
    ref = [cfg.reference_metric] if cfg.reference_metric and cfg.reference_metric not in metrics else []
    cells = cell_table(runs, axes, metrics + ref)
    diffs = paired_differences(runs, axes, metrics, next(iter(cfg.baseline.items()))) if cfg.baseline else []
    if not cfg.seeds:  # one run per cell: no seeds column
        cells, diffs = ([{k: v for k, v in row.items() if k != SEEDS} for row in rows_] for rows_ in (cells, diffs))
    reference = _reference(cfg, runs)
    out = cfg.out.rstrip("/")
    files = {"runs.csv": to_csv(runs, [*axes, *([SEED] if cfg.seeds else []), "run", *metrics, *ref]),
             "results.csv": intervals_csv(cells)}
    if diffs:
        files["differences.csv"] = intervals_csv(diffs)
    with tempfile.TemporaryDirectory(prefix="sweep-plot-") as tmp:
        png = _plot(cfg, cells, metrics, reference, Path(tmp))
        plot = png.name if png else None
        if png:
            storage.put_file(png.name, png)
        files["results.md"] = results_markdown(cfg, cells, diffs, reference, plot)
        for name, text in files.items():
            storage.put_text(name, text)
        tracking = _log_to_mlflow(cfg, files, png)
    outputs = {"table": f"{out}/results.md", "csv": f"{out}/results.csv", "runs": f"{out}/runs.csv"}
    if diffs:
        outputs["differences"] = f"{out}/differences.csv"
    if plot:
        outputs["plot"] = f"{out}/{plot}"
    text = intervals_markdown(cells) + (("\n" + intervals_markdown(diffs)) if diffs else "")
    return Written(text=text, figures={"metrics": metrics}, outputs=outputs, tracking=tracking)


def _plot(cfg: SweepConfig, cells: list[dict], metrics: list[str], reference: Interval | None,
          folder: Path) -> Path | None:
    """The first metric against the plot axis, as a PNG in ``folder`` (None: no numeric axis or metric)."""
    x = cfg.x_axis
    if not x or not metrics or not cells:
        return None
    from sonosynth.launch.sweep.plots import plot_metric_vs_axis

    name = f"{_FILE.sub('_', metrics[0])}_vs_{_FILE.sub('_', x)}.png"
    ref = None
    if reference is not None and reference.mean is not None:
        ref = {"label": cfg.reference_metric, "value": reference.mean, "lo": reference.lo, "hi": reference.hi}
    return plot_metric_vs_axis(cells, x, metrics[0], folder / name, reference=ref,
                               title=f"{cfg.stage} sweep: {metrics[0]} against {x}")


def _log_to_mlflow(cfg: SweepConfig, files: dict[str, str], png: Path | None) -> dict[str, Any]:
    """The tables and plot as artifacts of this sweep's one MLflow run (found again by its output)."""
    from sonosynth.infra.tracking import Tracker

    uri = cfg.tracking.resolved_uri()
    tracking = cfg.tracking.model_copy(update={"run_name": f"sweep {Path(cfg.out).name}"})
    tracker = Tracker(tracking, experiment=EXPERIMENT, run_id=_existing_run(uri, cfg.out))
    tracker.start(tags={"sonosynth.sweep_out": cfg.out, "sonosynth.stage": "sweep"})
    for name, text in files.items():
        tracker.log_text(text, name)
    if png is not None:
        tracker.log_artifact(png)
    tracker.close()
    return {"uri": tracker.uri, "run_id": tracker.run_id} if tracker.run_id else {}


def _existing_run(uri: str, out: str) -> str | None:
    try:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return None
        found = client.search_runs([experiment.experiment_id], f"tags.`sonosynth.sweep_out` = '{out}'",
                                   max_results=1)
        return found[0].info.run_id if found else None
    except Exception:  # noqa: BLE001 - a server that cannot be searched gets a new run
        return None
