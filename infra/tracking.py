"""MLflow tracking for one job: rank 0 owns the run, and tracking never kills training.

``Tracker`` wraps an ``MlflowClient`` bound to one run. Every call is best-effort: when the
tracking server is down or the store fails (at the start, mid-run or at the end), the
tracker warns once, goes offline and appends what it could not deliver to
``<offline_dir>/tracking_offline.jsonl``: params, tags, metrics, copies of artifacts, model
registrations and the run's end status, and how to create the run if it never was. It
retries every ``reconnect_every_s`` and, when the server is back, creates or continues the
run and flushes the backlog. Whatever is still undelivered at the end stays in that folder;
``tracking_replay.replay_folder`` (the next pipeline run into the same output, or ``sonosynth
tracking-replay``) sends it later, into the run the job had (or the one it would have had,
nested under the same parent), and removes the folder: a second replay finds nothing.
Other ranks get a ``Tracker`` with ``enabled=False`` that does nothing.

Every param, tag, run name and text artifact (and every offline record) passes through
``infra/secrets.redact`` before it is written anywhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sonosynth.infra.config import Config
from sonosynth.infra.secrets import redact, redact_obj, redact_uri

log = logging.getLogger(__name__)
OFFLINE_FILE = "tracking_offline.jsonl"
OFFLINE_RUN_FILE = "tracking_offline_run.json"
"""Written by earlier versions beside the records: how to create a run that never was (now a
``run`` record in the jsonl file); still read by ``replay_folder``."""
OFFLINE_ARTIFACTS = "artifacts"
"""Beside the records: copies of the artifacts they name, removed once delivered."""
DEFAULT_STORE = "runs/mlflow.db"
LEGACY_WRITER = "legacy"
"""The writer of records from before records named theirs (one run per folder)."""
TEXT_SUFFIXES = {".txt", ".yaml", ".yml", ".json", ".jsonl", ".md", ".csv", ".tsv", ".log", ".html", ".htm",
                 ".cfg", ".ini", ".toml", ".py", ".sh", ".env", ".xml"}
"""Artifact files read as text and redacted before they are logged."""
MAX_REDACTED_BYTES = 32 * 2**20
NOT_REJECTIONS = {401, 403, 404, 408, 429}
"""4xx answers that are no verdict on the record itself (auth, a missing run, throttling): the
record waits, like when the server is down."""


def _rejected(err: BaseException) -> bool:
    """The store answered and refused this record (a 4xx, e.g. a param changed): sending it
    again cannot help, so it is dropped with a warning instead of blocking the backlog."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    code = err.get_http_status_code()
    return 400 <= code < 500 and code not in NOT_REJECTIONS


def _missing(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.get_http_status_code() == 404


def _why(err: BaseException) -> str:
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return redact(f"{type(err).__name__}: {text}" if text else type(err).__name__)


def _redacted_text(file: Path) -> str | None:
    """The text of ``file`` redacted, when it is a text file that holds a secret; else None."""
    if file.suffix.lower() not in TEXT_SUFFIXES or file.stat().st_size > MAX_REDACTED_BYTES:
        return None
    try:
        text = file.read_text()
    except (UnicodeDecodeError, OSError):
        return None
    red = redact(text)
    return red if red != text else None


def _redacted_copy(path: Path, tmp: Path) -> Path:
    """``path`` itself, or a copy of it under ``tmp`` with its text files redacted."""
    if path.is_file():
        red = _redacted_text(path)
        if red is None:
            return path
        dest = tmp / path.name
        dest.write_text(red)
        return dest
    changed = {f: red for f in path.rglob("*") if f.is_file() and (red := _redacted_text(f)) is not None}
    if not changed:
        return path
    dest = tmp / path.name
    shutil.copytree(path, dest)
    for f, red in changed.items():
        (dest / f.relative_to(path)).write_text(red)
    return dest


def _read_records(file: Path) -> list[dict[str, Any]]:
    """The records of an offline file; a torn last line (a killed writer) is skipped."""
    records = []
    for i, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not a tracking record (a writer was killed mid-line?); skipped", file, i)
            continue
        record.setdefault("writer", LEGACY_WRITER)
        records.append(record)
    return records


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
        self.registered: dict[str, str] = {}
        """Model versions this tracker made: {registered model: version}."""
        self.writer = uuid.uuid4().hex[:12]
        """Names this tracker's records in a shared offline file."""
        self._last_attempt = 0.0
        self._backlog: list[dict[str, Any]] = []
        self._run_record: dict[str, Any] | None = None
        self._dirty = False
        self._copies = 0
        self._last_version: str | None = None
        self._warned: set[str] = set()
        self._client = None
        self._tags: dict[str, str] = {}
        if self.enabled:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, cfg.request_timeout_s)))
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.request_retries)
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
            # MLflow's own "View run ... at URL" lines: the stages print the run themselves, and the
            # URL would show a password in the tracking URI
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    # -- connection -----------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """The store's URI as it may be shown or written: a password in it masked."""
        return redact_uri(self.cfg.resolved_uri())

    @property
    def offline_file(self) -> Path:
        return self.offline_dir / OFFLINE_FILE

    def _connect(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.cfg.resolved_uri())
        return self._client

    def _go_offline(self, what: str, err: BaseException) -> None:
        if not self.offline:
            log.warning("MLflow at %s failed on %s (%s); training goes on, and what cannot be delivered is kept "
                        "in %s", redact(self.uri), what, _why(err), self.offline_file)
        self.offline = True
        self._last_attempt = time.monotonic()

    # -- the offline file -----------------------------------------------------------------
    def _append(self, records: list[dict[str, Any]]) -> None:
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        with open(self.offline_file, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))

    def _keep(self, record: dict[str, Any]) -> None:
        """Append ``record`` (redacted, with a copy of its file) to the backlog and the offline file."""
        path = record.get("path")
        record = {**redact_obj({k: v for k, v in record.items() if k != "path"}),
                  "run_id": self.run_id, "experiment": self.experiment, "writer": self.writer}
        if path is not None:  # relative to the offline folder: it may be moved (copied off a pod) before a replay
            record["path"] = str(self._offline_copy(Path(path)))
        self._backlog.append(record)
        self._append([record])

    def _artifact(self, record: dict[str, Any]) -> Path:
        """The file or folder an artifact record names (a kept copy is named relative to the offline folder)."""
        path = Path(record["path"])
        return path if path.is_absolute() else self.offline_dir / path

    def _offline_copy(self, path: Path) -> Path:
        """A copy of an artifact in the offline folder (its source may be a temp file), relative to that folder."""
        if not path.is_absolute():
            return path  # already a kept copy
        self._copies += 1
        dest = Path(OFFLINE_ARTIFACTS) / f"{self.writer}-{self._copies:04d}" / path.name
        (self.offline_dir / dest).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, self.offline_dir / dest)
        return dest

    def _discard_copy(self, record: dict[str, Any]) -> None:
        """A delivered artifact's kept copy is removed."""
        if record.get("kind") != "artifact":
            return
        path = Path(record["path"])
        if not path.is_absolute():
            shutil.rmtree(self.offline_dir / path.parent, ignore_errors=True)
        elif path.is_relative_to((self.offline_dir / OFFLINE_ARTIFACTS).resolve()):  # records of earlier versions
            shutil.rmtree(path.parent, ignore_errors=True)

    def _rewrite(self) -> None:
        """The offline file holds what is undelivered: other writers' records, then this
        tracker's (how to create its run while it has none, then its backlog, with the run id it
        has now). An offline folder left with nothing is removed."""
        file = self.offline_file
        others = [r for r in _read_records(file) if r["writer"] != self.writer] if file.is_file() else []
        mine = [{**r, "run_id": self.run_id} for r in self._backlog]
        if self.run_id is None and self._run_record is not None:
            mine.insert(0, self._run_record)
        records = others + mine
        if records:
            tmp = file.with_name(file.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, file)
        else:
            file.unlink(missing_ok=True)
            tidy_offline_dir(self.offline_dir)
        self._dirty = False

    # -- sending ----------------------------------------------------------------------------
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
            from mlflow.entities import RunTag

            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in record["values"].items()])
        elif kind == "artifact":
            path = self._artifact(record)
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), record.get("artifact_path"))
            else:
                client.log_artifact(self.run_id, str(path), record.get("artifact_path"))
        elif kind == "register":
            self._register(record["artifact_path"], record["name"], record.get("alias"))
        elif kind == "end":
            client.set_terminated(self.run_id, record["status"])
        else:
            raise ValueError(f"unknown tracking record kind {kind!r}")

    def _register(self, artifact_path: str, name: str, alias: str | None) -> None:
        """A new version of ``name`` from this run's ``artifact_path``; the version this run
        already made from it when there is one (a replay after a partial delivery)."""
        client = self._connect()
        source = f"{client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        try:
            client.get_registered_model(name)
            made = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
                    if v.source == source]
        except Exception as err:  # noqa: BLE001 - a missing model: create it
            if not _missing(err):
                raise
            client.create_registered_model(name)
            made = []
        version = str(made[0].version if made else client.create_model_version(name, source,
                                                                                 run_id=self.run_id).version)
        if alias:
            client.set_registered_model_alias(name, alias, version)
        self.registered[name] = self._last_version = version

    def _drop(self, record: dict[str, Any], err: BaseException) -> None:
        if record["kind"] not in self._warned:
            self._warned.add(record["kind"])
            log.warning("MLflow at %s refused a %s record of run %s (%s); it is dropped, the rest goes on",
                        redact(self.uri), record["kind"], self.run_id, _why(err))

    def _flush(self) -> None:
        """Send the backlog in order; a record the store refuses is dropped, any other failure raises."""
        while self._backlog:
            record = self._backlog[0]
            try:
                self._send(record)
            except Exception as err:  # noqa: BLE001
                if not _rejected(err):
                    raise
                self._drop(record, err)
            self._backlog.pop(0)
            self._dirty = True
            self._discard_copy(record)

    def _resume(self) -> None:
        """Open the run if it never was, then send the backlog; the offline file is rewritten to
        what is still undelivered (with the run's id) whether that succeeds or not."""
        try:
            if self.run_id is None:
                self._open_run()
                self._dirty = True
            self._flush()
        finally:
            if self._dirty:
                self._rewrite()

    def _reconnect(self) -> None:
        """While offline and due for a retry: reopen the run if needed, then send the backlog."""
        if time.monotonic() - self._last_attempt < self.cfg.reconnect_every_s:
            return
        try:
            self._resume()
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            self._go_offline("reconnect", err)
            return
        self.offline = False
        log.warning("MLflow at %s is reachable again; the backlog was delivered to run %s",
                    redact(self.uri), self.run_id)

    def _deliver(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            if self.offline:
                self._keep(record)
                self._reconnect()
                return
            try:
                self._send(record)
            except Exception as err:  # noqa: BLE001
                if _rejected(err):
                    self._drop(record, err)
                    return
                self._go_offline(record["kind"], err)
                self._keep(record)
        except Exception as err:  # noqa: BLE001 - even the offline folder failing must not stop training
            log.warning("a %s tracking record could not be kept in %s (%s); it is lost", record.get("kind"),
                        self.offline_dir, _why(err))

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
        run_name = redact(self.cfg.run_name) if self.cfg.run_name else None
        self.run_id = client.create_run(exp_id, run_name=run_name, tags=self._tags).info.run_id
        for record in self._backlog:
            record["run_id"] = self.run_id

    def start(self, *, tags: dict[str, str] | None = None) -> str | None:
        """Create the run, or reopen ``run_id`` (a resumed job continues its run).

        ``tags`` are merged over ``cfg.tags``; ``cfg.parent_run_id`` nests the run under that
        run (``mlflow.parentRunId``). When the server is unreachable, how to create the run is
        kept with the offline records, so that a reconnection or a replay creates it the same way."""
        if not self.enabled:
            return None
        self._tags = redact_obj({str(k): str(v) for k, v in {**self.cfg.tags, **(tags or {})}.items()})
        if self.cfg.parent_run_id:
            self._tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        try:
            self._open_run()
        except Exception as err:  # noqa: BLE001
            self._go_offline("start", err)
            try:
                if self.run_id is None:
                    self._run_record = {"kind": "run", "run_id": None, "experiment": self.experiment,
                                        "run_name": redact(self.cfg.run_name) if self.cfg.run_name else None,
                                        "tags": self._tags, "writer": self.writer}
                    self._append([self._run_record])
                else:  # a resumed run: its tags (the rest is in the records)
                    self._keep({"kind": "tags", "values": self._tags})
            except Exception as keep_err:  # noqa: BLE001
                log.warning("could not keep the run's offline records in %s (%s)", self.offline_dir,
                            _why(keep_err))
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled or not params:
            return
        self._deliver({"kind": "params", "values": {
            redact(str(k)): ("null" if v is None else v if isinstance(v, (bool, int, float)) else redact(str(v)))
            for k, v in params.items()}})

    def log_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        self._deliver({"kind": "tags", "values": {redact(str(k)): redact(str(v)) for k, v in tags.items()}})

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Numbers only: a value that is not one (None, a string) is left out."""
        if not self.enabled:
            return
        numbers = {}
        for k, v in values.items():
            try:
                numbers[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        if numbers:
            self._deliver({"kind": "metrics", "values": numbers, "step": int(step), "time": time.time()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder (its text files redacted). Offline, a copy is kept so that it
        can be sent later."""
        if not self.enabled:
            return
        path = Path(path)
        if not path.exists():
            log.warning("artifact %s not logged: it does not exist", path)
            return
        try:
            with tempfile.TemporaryDirectory(prefix="sonosynth-artifact-") as tmp:
                sent = _redacted_copy(path, Path(tmp))
                self._deliver({"kind": "artifact", "path": str(sent.resolve()), "artifact_path": artifact_path})
        except Exception as err:  # noqa: BLE001
            log.warning("artifact %s not logged (%s)", path, _why(err))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` (redacted) as the artifact ``artifact_file`` (e.g. 'config.yaml', 'plots/x.txt')."""
        self._log_file(artifact_file, lambda path: path.write_text(redact(text)))

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
        """Make ``artifact_path`` of this run a new version of registered model ``name``; returns
        the version. While MLflow is unreachable the registration is kept with the offline
        records and made when they are delivered (returns None)."""
        if not self.enabled or not name:
            return None
        self._last_version = None
        self._deliver({"kind": "register", "artifact_path": artifact_path, "name": name, "alias": alias})
        if self._last_version is None and self.offline:
            log.warning("model %s is not registered yet: MLflow at %s is unreachable; the registration waits in %s "
                        "and is made when MLflow is back (by this job, else when the records are replayed)",
                        name, redact(self.uri), self.offline_file)
        return self._last_version

    def reconnect(self) -> bool:
        """While offline: try the server now rather than after ``reconnect_every_s`` (creating the
        run if it never was, then sending the backlog); True when online."""
        if self.enabled and self.offline:
            self._last_attempt = -math.inf
            self._reconnect()
        return self.enabled and not self.offline

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self._deliver({"kind": "end", "status": status})
        if self.offline:
            self.reconnect()
            if self.offline:
                log.warning("%d tracking records were not delivered to %s; they are in %s (the next pipeline run "
                            "into the same output replays them; or: sonosynth tracking-replay %s)",
                            len(self._backlog), redact(self.uri), self.offline_file, self.offline_dir)


def tidy_offline_dir(offline_dir: str | Path) -> None:
    """Remove an offline folder that holds no records any more (its artifact copies went with them)."""
    offline_dir = Path(offline_dir)
    if (offline_dir / OFFLINE_FILE).exists():
        return
    (offline_dir / OFFLINE_RUN_FILE).unlink(missing_ok=True)
    store = offline_dir / OFFLINE_ARTIFACTS
    if store.is_dir() and not any(p.is_file() for p in store.rglob("*")):
        shutil.rmtree(store, ignore_errors=True)
    try:
        offline_dir.rmdir()
    except OSError:
        pass  # missing, or something else is in there
