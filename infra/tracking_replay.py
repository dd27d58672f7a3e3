"""Replaying tracking records a job could not deliver (``Tracker`` kept them offline): into the
run that was created before the server went away, or into a run created as the job would
have created it, nested under its parent. The next pipeline run and ``sonosynth
tracking-replay`` call ``replay_folder``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sonosynth.infra.secrets import redact
from sonosynth.infra.tracking import (
    LEGACY_WRITER, OFFLINE_FILE, OFFLINE_RUN_FILE, Tracker, TrackingConfig, _missing, _read_records, _why,
    tidy_offline_dir,
)

log = logging.getLogger(__name__)


@dataclass
class Replayed:
    """What ``replay_folder`` delivered."""

    runs: list[str] = field(default_factory=list)
    """The run ids the records went to, one per writer, in order."""
    records: int = 0
    registered: dict[str, str] = field(default_factory=dict)
    """Model versions made from the kept registrations: {registered model: version}."""
    created: list[str] = field(default_factory=list)
    """Those of ``runs`` that the replay created (their job never reached the server)."""


def replay_folder(offline_dir: str | Path, cfg: TrackingConfig, experiment: str | None = None, *,
                  parent_of: Callable[[dict[str, str]], str | None] | None = None, one_run: bool = False) -> Replayed:
    """Send a job's undelivered tracking records; the folder is removed once all were delivered.

    Records are grouped by the tracker that wrote them. A run created before the server went
    away gets the rest of its records; a run that never was is created as the job would have
    created it (experiment, name, tags, its parent run), in ``experiment`` if given. Its parent
    is the one it was given then, else ``parent_of(tags)``, else ``cfg.parent_run_id``. With
    ``one_run`` every writer's records go to one run (a pipeline's parent run, which each of its
    invocations reopens): the one a writer had, else the first one created. Kept registrations
    are made. Raises ``FileNotFoundError`` when there is nothing to replay and
    ``ConnectionError`` when MLflow cannot take the records: what was delivered until then is
    taken out of the file (and a created run's id written into the rest), so nothing is sent twice."""
    offline_dir = Path(offline_dir)
    file = offline_dir / OFFLINE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: nothing to replay")
    legacy_how: dict[str, Any] = {}
    if (offline_dir / OFFLINE_RUN_FILE).is_file():
        legacy_how = {"kind": "run", "run_id": None, **json.loads((offline_dir / OFFLINE_RUN_FILE).read_text())}
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in _read_records(file):
        groups.setdefault(record["writer"], []).append(record)
    result = Replayed()
    if not groups:  # only torn lines
        file.unlink()
        tidy_offline_dir(offline_dir)
        return result
    shared = next((r["run_id"] for rs in groups.values() for r in rs if r.get("run_id")), None) if one_run else None
    for writer, records in groups.items():
        how = next((r for r in records if r["kind"] == "run"), None)
        records = [r for r in records if r["kind"] != "run"]
        run_id = shared or next((r["run_id"] for r in records if r.get("run_id")), None)
        if how is None and writer == LEGACY_WRITER and legacy_how:
            how = {**legacy_how, "writer": writer}
        tracker = _replayer(offline_dir, cfg, experiment, writer, how or {}, records, run_id, parent_of)
        try:
            if tracker.run_id is not None:
                try:
                    tracker._connect().get_run(tracker.run_id)
                except Exception as err:  # noqa: BLE001
                    if not _missing(err):
                        raise
                    log.warning("run %s is not in %s; its records go to a new run", tracker.run_id,
                                redact(tracker.uri))
                    tracker.run_id, tracker._run_record, tracker._dirty = None, how, True
            created = tracker.run_id is None
            tracker._resume()
        except Exception as err:  # noqa: BLE001
            raise ConnectionError(f"MLflow at {redact(tracker.uri)} could not take the records in {file} "
                                  f"({_why(err)})") from err
        if one_run:
            shared = tracker.run_id
        if tracker.run_id not in result.runs:
            result.runs.append(tracker.run_id)
        result.records += len(records)
        result.registered.update(tracker.registered)
        if created:
            result.created.append(tracker.run_id)
    tidy_offline_dir(offline_dir)
    return result


def _replayer(offline_dir: Path, cfg: TrackingConfig, experiment: str | None, writer: str, how: dict[str, Any],
              records: list[dict[str, Any]], run_id: str | None,
              parent_of: Callable[[dict[str, str]], str | None] | None) -> Tracker:
    """A tracker that stands in for the one that wrote ``records``."""
    tags = dict(how.get("tags") or {})
    parent = tags.pop("mlflow.parentRunId", None)
    if not parent and parent_of is not None:
        parent = parent_of(tags)
    experiment = (experiment or how.get("experiment") or next((r["experiment"] for r in records if r.get("experiment")),
                                                               None) or "sonosynth")
    cfg = cfg.model_copy(update={"run_name": cfg.run_name or how.get("run_name"), "tags": {**tags, **cfg.tags},
                                 "parent_run_id": parent or cfg.parent_run_id})
    tracker = Tracker(cfg, offline_dir=offline_dir, experiment=experiment, run_id=run_id)
    tracker.writer = writer
    tracker._tags = {str(k): str(v) for k, v in cfg.tags.items()}
    if cfg.parent_run_id:
        tracker._tags["mlflow.parentRunId"] = cfg.parent_run_id
    tracker._run_record = {**how, "writer": writer} if run_id is None and how else None
    tracker._backlog = [{**r, "run_id": run_id} for r in records]
    tracker.offline = True
    return tracker


def replay(offline_dir: str | Path, cfg: TrackingConfig, experiment: str | None = None) -> str | None:
    """``replay_folder``; returns the run id the (last writer's) records went to (None: there were none)."""
    runs = replay_folder(offline_dir, cfg, experiment).runs
    return runs[-1] if runs else None
