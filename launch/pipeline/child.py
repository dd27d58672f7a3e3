"""A stage run on behalf of another: a pipeline section, a sweep cell, promote's evaluations.

The parent decides where the child writes, which MLflow store, experiment, parent run and
tags it is tracked under, and whether it shows progress bars; ``child_config`` applies
those decisions to the child's own fields (only those its config class has) and validates it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sonosynth.infra.config import Config, build
from sonosynth.infra.tracking import TrackingConfig


def child_config(config_class: type[Config], data: dict[str, Any], *, source: str, out: str | None = None,
                 tracking: dict[str, Any] | None = None, progress: bool = True) -> Config:
    """A ``config_class`` config from ``data`` with the parent's ``out``, ``tracking`` fields laid over the
    child's own (when the stage tracks itself), and progress bars off unless ``progress``.
    ``source`` names the child in validation errors."""
    fields = config_class.model_fields
    data = dict(data)
    if out is not None and "out" in fields:
        data["out"] = out
    if tracking is not None and "tracking" in fields:
        data["tracking"] = {**(data.get("tracking") or {}), **tracking}
    if not progress:
        if "progress" in fields:
            data["progress"] = False
        if "engine" in fields:
            data["engine"] = {**(data.get("engine") or {}), "progress": False}
    return build(config_class, data, source)


def parent_root(out: str) -> str:
    """A parent's ``out`` without a trailing slash; a local folder made absolute (Ray workers and tasks
    run in other folders)."""
    return out.rstrip("/") if "://" in out else str(Path(out).expanduser().resolve())


def parent_store(tracking: TrackingConfig, out: str) -> str:
    """The MLflow store a parent and its children write to: tracking.uri, $MLFLOW_TRACKING_URI, else
    OUT/mlflow.db for a local OUT."""
    if tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "://" in out:
        return tracking.resolved_uri()
    return f"sqlite:///{Path(parent_root(out)) / 'mlflow.db'}"
