"""One evaluation's MLflow run, for both kinds of model: its config, figures and files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.tracking import Tracker

EXPERIMENT = "sonosynth-evaluate"


def track(cfg: Any, metrics: dict[str, float], files: list[Path], tags: dict[str, str] | None = None, *,
          stage: str = "evaluate", experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Log ``cfg``, ``metrics`` and ``files`` as one finished run of a scoring stage (evaluate, and
    quality under its own stage and experiment); the Report's ``tracking``."""
    tracker = Tracker(cfg.tracking, experiment=experiment, offline_dir=offline_dir_for(cfg.out))
    tracker.start(tags={"sonosynth.stage": stage, "sonosynth.out": cfg.out, **(tags or {})})
    tracker.log_params(cfg.flat())
    tracker.log_metrics(metrics, 0)
    for path in files:
        tracker.log_artifact(path)
    tracker.close("FINISHED")
    return {"uri": tracker.uri if tracker.enabled else None, "run_id": tracker.run_id, "offline": tracker.offline}


def fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
