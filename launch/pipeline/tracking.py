"""The pipeline's MLflow side: the parent run, nested stage runs, failure marks, offline replay."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any


from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.secrets import redact, redact_uri
from sonosynth.infra.tracking import OFFLINE_FILE, Tracker, TrackingConfig
from sonosynth.infra.tracking_replay import replay_folder

from sonosynth.launch.pipeline.config import DONE, STATE, REPLACED, PipelineConfig
from sonosynth.launch.pipeline.plan import Step, _is_local

log = logging.getLogger(__name__)


def _first_lines(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines()[:4] if line.strip())
    text = text or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


class RunTracking:
    """The tracking half of ``Run`` (``runner.py``)."""

    cfg: PipelineConfig
    root: str
    pkey: str
    uri: str
    experiment: str
    parent: Tracker | None
    planned_keys: dict[str, str]
    reports: dict[str, dict[str, Any]]
    status: dict[str, str]
    _recorded_parent: str | None = None
    _late_parent: bool = False

    def _tracking(self, **extra: Any) -> TrackingConfig:
        base = self.cfg.tracking.model_dump(exclude={"uri", "experiment", "parent_run_id", "tags", "run_name"})
        return TrackingConfig(**{**base, "uri": self.uri, "experiment": self.experiment, **extra})

    def _state_dir(self) -> str:
        return f"{STATE}/{self.pkey}"

    def _parent_offline_dir(self) -> Path:
        """Where the parent run's undelivered records go (a temp folder for a remote OUT)."""
        return offline_dir_for(f"{self.root}/{STATE}/{self.pkey}")

    def _open_parent(self) -> None:
        record_key = f"{self._state_dir()}/run.json"
        record = json.loads(self.storage.get_text(record_key)) if self.storage.exists(record_key) else {}
        run_id = record.get("run_id") if redact_uri(record.get("uri")) == redact_uri(self.uri) else None
        tracking = self._tracking(run_name=self.cfg.name or "pipeline",
                                  tags={**self.cfg.tracking.tags, "sonosynth.pipeline": self.cfg.name or "pipeline",
                                        "sonosynth.pipeline_id": self.pkey})
        self.parent = Tracker(tracking, offline_dir=self._parent_offline_dir(),
                              experiment=self.experiment, run_id=run_id)
        self._recorded_parent = run_id
        self.parent.start(tags={"sonosynth.stage": "pipeline", "sonosynth.out": self.root})
        self._late_parent = self.parent.run_id is None  # MLflow is down at the start: the run comes later
        self._remember_parent()
        self.parent.log_params({f"key.{section}": key or "not run" for section, key in self.planned_keys.items()})
        self.parent.log_params({f"source.{s.section}": f"{s.source['digest']} ({s.source['files']} files)"
                                for s in self.steps if s.source})

    def _remember_parent(self) -> None:
        """``run.json`` names the parent run as soon as it exists: the next run reopens it, and a
        replay nests the sections' runs that never were under it."""
        if self.parent is None or not self.parent.run_id or self.parent.run_id == self._recorded_parent:
            return
        self.storage.put_text(f"{self._state_dir()}/run.json", json.dumps({"run_id": self.parent.run_id,
                                                                           "uri": redact_uri(self.uri)}))
        self._recorded_parent = self.parent.run_id

    def _parent_back(self) -> None:
        """Before a section: a parent run MLflow could not take yet gets another try, so that the
        section's run nests under it when the server is back."""
        if self.parent is not None and self.parent.offline:
            self.parent.reconnect()
            self._remember_parent()

    def _adopt_orphans(self) -> None:
        """A parent run created late (MLflow was down at the start and came back while sections
        ran): the sections' runs made meanwhile without a parent are nested under it."""
        if not self._late_parent or self.parent is None or not self.parent.run_id \
                or self.parent.offline:
            return
        try:
            from mlflow import MlflowClient

            client = MlflowClient(self.uri)
            for section, report in self.reports.items():
                run_id = ((report or {}).get("tracking") or {}).get("run_id")
                if self.status.get(section) != "ran" or not run_id:
                    continue
                if "mlflow.parentRunId" not in client.get_run(run_id).data.tags:
                    client.set_tag(run_id, "mlflow.parentRunId", self.parent.run_id)
        except Exception as err:  # noqa: BLE001 - tracking never stops the pipeline
            log.warning("could not nest the sections' runs under the pipeline's run %s: %s", self.parent.run_id,
                        _first_lines(err))

    def _stage_tags(self, step: Step) -> dict[str, str]:
        tags = {"sonosynth.pipeline": self.cfg.name or "pipeline", "sonosynth.pipeline_id": self.pkey,
                "sonosynth.pipeline_section": step.section, "sonosynth.pipeline_key": step.key}
        if step.source:
            tags.update({"sonosynth.source_fingerprint": step.source["digest"],
                         "sonosynth.source_files": str(step.source["files"]),
                         "sonosynth.source": str(step.source["uri"])})
        return tags

    def _offline_folders(self) -> tuple[dict[Path, str], dict[Path, str]]:
        """The tracking-offline folders holding records: ({parent's folder: pipeline id},
        {section's folder: its storage prefix}). This plan's are known without a scan (a remote
        OUT's are per-output temp folders on this machine); a local OUT is also searched, for
        earlier plans' and nested jobs' folders (promote's evaluations), not those set aside."""
        parents = {self._parent_offline_dir(): self.pkey}
        sections = {offline_dir_for(s.out): f"{s.section}/{s.key}" for s in self.steps if not s.skip and s.key}
        root = Path(self.root)
        if _is_local(self.root) and root.is_dir():
            for file in root.rglob(f"tracking-offline/{OFFLINE_FILE}"):
                rel = file.parent.parent.relative_to(root)
                if rel.parts[:1] == (STATE,) and len(rel.parts) == 2:
                    parents.setdefault(file.parent, rel.parts[1])
                elif REPLACED not in rel.parts:
                    sections.setdefault(file.parent, rel.as_posix())

        def pending(folders: dict[Path, str]) -> dict[Path, str]:
            seen, out = set(), {}
            for folder, name in sorted(folders.items()):
                if (folder / OFFLINE_FILE).is_file() and folder.resolve() not in seen:
                    seen.add(folder.resolve())
                    out[folder] = name
            return out

        return pending(parents), pending(sections)

    def _parent_run_of(self, pkey: str) -> dict[str, Any]:
        key = f"{STATE}/{pkey}/run.json"
        return json.loads(self.storage.get_text(key)) if self.storage.exists(key) else {}

    def replay_offline(self) -> None:
        """Deliver what earlier runs into this OUT could not (the pipeline's parent runs first, then
        the sections' records, nested under them as if the server had never been away), and say so
        in one line. Delivered records leave their folders; what MLflow still cannot take stays for
        the next run."""
        if not self.cfg.tracking.enabled:
            return
        parents, sections = self._offline_folders()
        total = len(parents) + len(sections)
        if not total:
            return

        def parent_of(tags: dict[str, str]) -> str | None:
            """A section's run that never was nests under its pipeline's parent run."""
            if "sonosynth.pipeline_section" not in tags:
                return None  # e.g. promote's evaluations: they nest under promote's run
            return self._parent_run_of(tags.get("sonosynth.pipeline_id", "-")).get("run_id")

        runs, records, registered, done = 0, 0, {}, 0
        try:
            for folder, pkey in parents.items():
                got = replay_folder(folder, self._tracking(), one_run=True)  # each invocation reopens it
                old = self._parent_run_of(pkey)
                moved = redact_uri(old.get("uri")) != redact_uri(self.uri)
                if got.runs and (not old.get("run_id") or moved or got.created):
                    self.storage.put_text(f"{STATE}/{pkey}/run.json", json.dumps({"run_id": got.runs[-1],
                                                                                   "uri": redact_uri(self.uri)}))
                runs, records, done = runs + len(got.runs), records + got.records, done + 1
            for folder, prefix in sections.items():
                got = replay_folder(folder, self._tracking(), parent_of=parent_of)
                if got.registered:
                    self._note_registration(prefix, got.registered)
                runs, records, done = runs + len(got.runs), records + got.records, done + 1
                registered.update(got.registered)
        except Exception as err:  # noqa: BLE001 - tracking never stops the pipeline
            print(f"tracking: {total - done} of {total} tracking-offline folders could not be replayed "
                  f"({_first_lines(err)}); they stay for the next run", flush=True)
            return
        models = "".join(f"; registered {name} version {v}" for name, v in registered.items())
        print(f"tracking: replayed {records} records of {runs} runs that MLflow at {redact(self.uri)} could not "
              f"take earlier ({len(parents)} pipeline, {len(sections)} section folders){models}", flush=True)

    def _note_registration(self, prefix: str, registered: dict[str, str]) -> None:
        """A model registered at replay goes into its section's report (``${SECTION.tracking.version}``),
        so a deferred promotion finds it on this run."""
        key = f"{prefix}/{DONE}"
        if not self.storage.exists(key):
            return
        data = json.loads(self.storage.get_text(key))
        tracking = data.get("report", {}).get("tracking")
        if not isinstance(tracking, dict) or tracking.get("version"):
            return
        name, version = next(iter(registered.items()))
        tracking.update(registered_model=tracking.get("registered_model") or name, version=version, offline=False)
        self.storage.put_text(key, json.dumps(data, indent=1, default=str))

    # -- one stage ----------------------------------------------------------------------------

    def _mark_failed(self, step: Step, err: BaseException, started: float) -> None:
        """The stage's own run FAILED with the error; or, if it never opened one, a FAILED run."""
        if not self.cfg.tracking.enabled:
            return
        error = redact(_first_lines(err))[:4900]
        try:
            from mlflow import MlflowClient

            client = MlflowClient(self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            query = (f"tags.`sonosynth.pipeline_key` = '{step.key}' and "
                     f"tags.`sonosynth.pipeline_section` = '{step.section}'")
            if self.parent is not None and self.parent.run_id:
                query += f" and tags.`mlflow.parentRunId` = '{self.parent.run_id}'"
            runs = client.search_runs(
                [exp.experiment_id], query,
                order_by=["attributes.start_time DESC"], max_results=1) if exp else []
            run = runs[0] if runs and runs[0].info.start_time >= int(started * 1000) - 1000 else None
            if run is None and runs and runs[0].info.status == "RUNNING":
                run = runs[0]  # the resumed run of a training job
            if run is not None:
                client.set_tag(run.info.run_id, "sonosynth.error", error)
                if run.info.status != "FAILED":
                    client.set_terminated(run.info.run_id, "FAILED")
                return
        except Exception as track_err:  # noqa: BLE001 - fall back to a run of our own (offline-safe)
            log.warning("could not look up the run of %s: %s", step.section, _first_lines(track_err))
        own = Tracker(self._tracking(parent_run_id=self.parent.run_id if self.parent else None,
                                     run_name=step.section, tags=self._stage_tags(step)),
                      offline_dir=offline_dir_for(step.out), experiment=self.experiment)
        own.start(tags={"sonosynth.stage": step.stage, "sonosynth.out": step.out, "sonosynth.error": error})
        own.log_text("".join(traceback.format_exception(err)), "error.txt")
        own.close("FAILED")

    # -- the whole run ------------------------------------------------------------------------
