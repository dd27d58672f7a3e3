"""MLflow tracking for one job: rank 0 owns the run, and tracking never kills training.

``Tracker`` wraps an ``MlflowClient`` bound to one run. Every call is best-effort: when the
tracking server is down or the store fails, the tracker warns once, goes offline, appends
what it could not deliver to ``<offline_dir>/tracking_offline.jsonl`` (files are copied
there too), retries now and then, and flushes the backlog when the server is back.
Whatever is still undelivered at the end stays in that file; ``sonosynth tracking-replay``
sends it later. Other ranks get a ``Tracker`` with ``enabled=False`` that does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sonosynth.infra.config import Config

log = logging.getLogger(__name__)
OFFLINE_FILE = "tracking_offline.jsonl"
OFFLINE_RUN_FILE = "tracking_offline_run.json"
"""Beside the records: how to create the run (experiment, name, tags) when it never was."""
DEFAULT_STORE = "runs/mlflow.db"


class TrackingConfig(Config):
    """Where and how a job is tracked in MLflow."""

    enabled: bool = True
    """Track this job in MLflow (false: log nothing, register nothing)."""
    uri: str | None = None
    """Tracking URI: http(s)://server:5000, sqlite:///path.db or a folder. Null uses
    $MLFLOW_TRACKING_URI, else a local SQLite store at runs/mlflow.db (artifacts beside it)."""
    experiment: str | None = None
    """Experiment name (null: the stage's default, e.g. sonosynth-train-lora)."""
    run_name: str | None = None
    """Run name shown in the MLflow UI (null: MLflow picks one)."""
    registered_model: str | None = None
    """Register the job's model under this name (null: the stage's default; '' to skip)."""
    request_timeout_s: float = 10.0
    """HTTP timeout of one tracking request; a slow server must not stall training."""
    request_retries: int = 1
    """HTTP retries of one tracking request before the tracker goes offline."""
    reconnect_every_s: float = 60.0
    """While offline, try to reach the server again after this many seconds."""
    parent_run_id: str | None = None
    """Nest the job's run under this MLflow run (the pipeline sets it; null: a top-level run)."""
    tags: dict[str, str] = {}
    """Extra tags on the job's run, merged with the stage's own (the pipeline's section and key)."""

    def resolved_uri(self) -> str:
        """The URI with local paths made absolute (Ray workers run in other folders)."""
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            path = Path(uri.removeprefix("sqlite:///")).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{path}"
        if "://" not in uri and not uri.startswith("databricks"):
            return Path(uri).resolve().as_uri()
        return uri

    def artifact_location(self) -> str | None:
        """Local stores keep artifacts in ``mlartifacts/`` beside the database; servers decide."""
        uri = self.resolved_uri()
        if uri.startswith("sqlite:///"):
            return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return None


class Tracker:
    """One MLflow run, written by one process. Safe to call when disabled or offline."""

    def __init__(self, cfg: TrackingConfig, *, enabled: bool = True, offline_dir: str | Path | None = None,
                 experiment: str = "sonosynth", run_id: str | None = None):
        self.cfg = cfg
        self.enabled = enabled and cfg.enabled
        self.offline_dir = Path(offline_dir) if offline_dir else Path("runs") / "tracking-offline"
        self.experiment = cfg.experiment or experiment
        self.run_id = run_id
        self.offline = False
        self._last_attempt = 0.0
        self._backlog: list[dict[str, Any]] = []
        self._client = None
        self._tags: dict[str, str] = {}
        if self.enabled:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, cfg.request_timeout_s)))
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.request_retries)
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"

    # -- connection -----------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return self.cfg.resolved_uri()

    def _connect(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def _go_offline(self, what: str, err: BaseException) -> None:
        if not self.offline:
            log.warning("MLflow at %s failed on %s (%s: %s); training goes on, and what cannot be "
                        "delivered is kept in %s", self.uri, what, type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "", self.offline_dir / OFFLINE_FILE)
        self.offline = True
        self._last_attempt = time.monotonic()

    def _keep(self, record: dict[str, Any]) -> None:
        record = {**record, "run_id": self.run_id, "experiment": self.experiment}
        self._backlog.append(record)
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        with open(self.offline_dir / OFFLINE_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _send(self, record: dict[str, Any]) -> None:
        client = self._connect()
        kind = record["kind"]
        if kind == "metrics":
            from mlflow.entities import Metric

            ts = int(record["time"] * 1000)
            client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, record["step"])
                                                   for k, v in record["values"].items()])
        elif kind == "params":
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in record["values"].items()]
            for i in range(0, len(params), 100):
                client.log_batch(self.run_id, params=params[i:i + 100])
        elif kind == "tags":
            for k, v in record["values"].items():
                client.set_tag(self.run_id, k, str(v))
        elif kind == "artifact":
            path = Path(record["path"])
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), record.get("artifact_path"))
            else:
                client.log_artifact(self.run_id, str(path), record.get("artifact_path"))
        elif kind == "end":
            client.set_terminated(self.run_id, record["status"])
        else:
            raise ValueError(f"unknown tracking record kind {kind!r}")

    def _flush(self) -> None:
        while self._backlog:
            self._send(self._backlog[0])
            self._backlog.pop(0)

    def _reconnect(self) -> None:
        """While offline and due for a retry: reopen the run if needed, then send the backlog."""
        if time.monotonic() - self._last_attempt < self.cfg.reconnect_every_s:
            return
        try:
            if self.run_id is None:
                self._open_run()
            self._flush()
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            self._go_offline("reconnect", err)
            return
        self.offline = False
        (self.offline_dir / OFFLINE_FILE).unlink(missing_ok=True)
        (self.offline_dir / OFFLINE_RUN_FILE).unlink(missing_ok=True)
        log.warning("MLflow at %s is reachable again; the backlog was delivered", self.uri)

    def _deliver(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.offline:
            self._keep(record)
            self._reconnect()
            return
        try:
            self._send(record)
        except Exception as err:  # noqa: BLE001
            self._go_offline(record["kind"], err)
            self._keep(record)

    # -- the run --------------------------------------------------------------------------
    def _open_run(self) -> None:
        client = self._connect()
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
            for k, v in self._tags.items():
                client.set_tag(self.run_id, k, v)
            return
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            self.experiment, artifact_location=self.cfg.artifact_location())
        self.run_id = client.create_run(exp_id, run_name=self.cfg.run_name, tags=self._tags).info.run_id
        for record in self._backlog:
            record["run_id"] = self.run_id

    def start(self, *, tags: dict[str, str] | None = None) -> str | None:
        """Create the run, or reopen ``run_id`` (a resumed job continues its run).

        ``tags`` are merged over ``cfg.tags``; ``cfg.parent_run_id`` nests the run under that
        run (``mlflow.parentRunId``). When the server is unreachable, how to create the run is
        kept beside the offline records, so that a replay creates it the same way."""
        if not self.enabled:
            return None
        self._tags = {k: str(v) for k, v in {**self.cfg.tags, **(tags or {})}.items()}
        if self.cfg.parent_run_id:
            self._tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        try:
            self._open_run()
        except Exception as err:  # noqa: BLE001
            self._go_offline("start", err)
            if self.run_id is None:
                self.offline_dir.mkdir(parents=True, exist_ok=True)
                (self.offline_dir / OFFLINE_RUN_FILE).write_text(json.dumps(
                    {"experiment": self.experiment, "run_name": self.cfg.run_name, "tags": self._tags}))
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self._deliver({"kind": "params", "values": {k: ("null" if v is None else v) for k, v in params.items()}})

    def log_tags(self, tags: dict[str, Any]) -> None:
        self._deliver({"kind": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self._deliver({"kind": "metrics", "values": values, "step": step, "time": time.time()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder. Offline, a copy is kept so that it can be sent later."""
        if not self.enabled:
            return
        path = Path(path)
        if self.offline or self.run_id is None:
            keep = self.offline_dir / "artifacts" / f"{len(self._backlog):04d}" / path.name
            keep.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, keep)
            path = keep
        self._deliver({"kind": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file`` (e.g. 'config.yaml', 'plots/x.txt')."""
        self._log_file(artifact_file, lambda path: path.write_text(text))

    def log_image(self, image, artifact_file: str) -> None:
        """Log a PIL image or an HxW(x3) uint8 array as a PNG artifact."""
        from PIL import Image

        img = image if isinstance(image, Image.Image) else Image.fromarray(image)
        self._log_file(artifact_file, lambda path: img.save(path))

    def _log_file(self, artifact_file: str, write) -> None:
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory(prefix="sonosynth-artifact-") as tmp:
            path = Path(tmp) / Path(artifact_file).name
            write(path)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def register(self, artifact_path: str, name: str, *, alias: str | None = None) -> str | None:
        """Make ``artifact_path`` of this run a new version of registered model ``name``."""
        if not self.enabled or not name or self.offline or self.run_id is None:
            if self.enabled and name:
                log.warning("model not registered as %s: MLflow is unreachable; register it later "
                            "from run %s", name, self.run_id)
            return None
        try:
            client = self._connect()
            try:
                client.get_registered_model(name)
            except Exception:  # noqa: BLE001 - missing model: create it
                client.create_registered_model(name)
            source = f"{client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
            version = client.create_model_version(name, source, run_id=self.run_id).version
            if alias:
                client.set_registered_model_alias(name, alias, version)
            return str(version)
        except Exception as err:  # noqa: BLE001
            self._go_offline("register", err)
            return None

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self._deliver({"kind": "end", "status": status})
        if self.offline:
            self._last_attempt = 0.0
            self._reconnect()
            if self.offline:
                log.warning("%d tracking records were not delivered to %s; they are in %s "
                            "(send them with: sonosynth tracking-replay %s)", len(self._backlog),
                            self.uri, self.offline_dir / OFFLINE_FILE, self.offline_dir)


def replay(offline_dir: str | Path, cfg: TrackingConfig, experiment: str | None = None) -> str:
    """Send a job's undelivered tracking records; returns the run id they went to.

    The run and experiment come from the records themselves (the job's own run when it was
    created before the server went away); ``experiment`` only overrides them. A run that was
    never created gets the name and tags the job gave it; ``cfg.parent_run_id`` (e.g. the
    pipeline's run, replayed first) nests it."""
    offline_dir = Path(offline_dir)
    file = offline_dir / OFFLINE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: nothing to replay")
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    run_id = next((r["run_id"] for r in records if r.get("run_id")), None)
    how = {}
    if (offline_dir / OFFLINE_RUN_FILE).is_file():
        how = json.loads((offline_dir / OFFLINE_RUN_FILE).read_text())
    experiment = experiment or next((r["experiment"] for r in records if r.get("experiment")),
                                    how.get("experiment") or "sonosynth")
    kept = how.get("tags") or {}
    tags = {k: v for k, v in kept.items() if k != "mlflow.parentRunId"}
    cfg = cfg.model_copy(update={"run_name": cfg.run_name or how.get("run_name"), "tags": {**tags, **cfg.tags},
                                 "parent_run_id": cfg.parent_run_id or kept.get("mlflow.parentRunId")})
    tracker = Tracker(cfg, offline_dir=offline_dir, experiment=experiment, run_id=run_id)
    if tracker.start() is None:
        raise ConnectionError(f"MLflow at {tracker.uri} is still unreachable")
    tracker._backlog = [{**r, "run_id": tracker.run_id} for r in records]
    tracker._flush()
    file.rename(file.with_suffix(".delivered"))
    (offline_dir / OFFLINE_RUN_FILE).unlink(missing_ok=True)
    return tracker.run_id
