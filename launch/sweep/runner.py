"""``sonosynth sweep``: the prepare pipeline, then every run (one at a time here, or N at once as Ray
tasks), then the tables and the plot from what MLflow holds.

A run is its stage's job, so a finished run is skipped and a killed one resumes; the tables are
rebuilt from the MLflow runs every time, so a sweep that was killed and started again writes the
same tables as one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from sonosynth.infra.secrets import redact_obj
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import open_storage
from sonosynth.launch.pipeline.child import parent_root, parent_store
from sonosynth.launch.sweep.cells import prepare_dir, run_one, with_prepared
from sonosynth.launch.sweep.config import SweepConfig
from sonosynth.launch.sweep.results import write_results

log = logging.getLogger(__name__)


def resolved(cfg: SweepConfig) -> SweepConfig:
    """``cfg`` with a local ``out`` made absolute (Ray tasks run in other folders) and the tracking
    store fixed as the pipeline's: tracking.uri, else $MLFLOW_TRACKING_URI, else OUT/mlflow.db."""
    out = parent_root(cfg.out)
    tracking = cfg.tracking.model_copy(update={"uri": parent_store(cfg.tracking, out)})
    return cfg.model_copy(update={"out": out, "tracking": tracking})


def prepare(cfg: SweepConfig) -> SweepConfig:
    """Run (or resume, or skip) the prepare pipeline into OUT/prepare; ``cfg`` with its ${prepare...}
    references filled in."""
    import yaml

    from sonosynth.launch.pipeline.config import resolve_pipeline
    from sonosynth.launch.stages import PIPELINE, get_stage

    flags: dict[str, Any] = {"out": prepare_dir(cfg), "progress": False}
    if cfg.tracking.uri:
        flags["tracking"] = {"uri": cfg.tracking.uri}
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in cfg.prepare_set.items()]
    pipeline = resolve_pipeline(cfg.prepare, flags, overrides)
    log.warning("sweep: preparing the data with pipeline %s in %s", cfg.prepare, prepare_dir(cfg))
    report = get_stage(PIPELINE).run(pipeline)
    if report.failed:
        raise StageFailed(f"the prepare pipeline {cfg.prepare} failed: {report.failed}; fix it and run the sweep "
                          "again (finished sections are kept)")
    return with_prepared(cfg, report.figures["stages"])


def run(cfg: SweepConfig) -> Report:
    """Every run (finished ones are skipped by their stage), then the tables from MLflow."""
    cfg = resolved(cfg)
    if cfg.prepare:
        cfg = prepare(cfg)
    specs = cfg.runs()
    rows: dict[str, dict[str, Any]] = {}
    started = time.monotonic()

    def on_done(row: dict[str, Any]) -> None:
        rows[row["run"]] = row
        took = f"{row['end'] - row['start']:.0f} s" if "end" in row and "start" in row else "lost"
        state = f"FAILED: {row['error']}" if row.get("error") else took
        _echo(f"sweep run {len(rows)}/{len(specs)} {row['run']}: {state}")

    if cfg.parallel == 1:
        for spec in specs:
            on_done(run_one(cfg, spec))
    else:
        from sonosynth.launch.sweep.parallel import run_parallel

        run_parallel(cfg, specs, on_done)
    ordered = [rows[s.name] for s in specs]
    failures = {r["run"]: r["error"] for r in ordered if r.get("error")}
    storage = open_storage(cfg.out, cfg.storage)
    written = write_results(cfg, ordered, storage)
    storage.put_text("summary.json", json.dumps(redact_obj({
        "runs": ordered, "failed": failures, "seconds": round(time.monotonic() - started, 1),
        "parallel": cfg.parallel, "tables": written.outputs}), indent=1, default=str))
    text = (f"sweep of {cfg.stage}: {len(cfg.cells())} cells x {len(cfg.seeds) or 1} seeds = {len(specs)} runs "
            f"({len(failures)} failed)\n" + written.text)
    return Report(stage="sweep", out=cfg.out, text=text,
                  figures={"cells": len(cfg.cells()), "runs": len(specs), "failed": failures, **written.figures},
                  outputs=written.outputs, tracking=written.tracking,
                  failed=f"{len(failures)} runs failed: {', '.join(failures)}; run the sweep again to resume them"
                  if failures else None)


def _echo(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
