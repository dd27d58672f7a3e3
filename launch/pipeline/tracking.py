"""The pipeline's MLflow side: the parent run, nested stage runs, failure marks, offline replay."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any


from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.tracking import OFFLINE_FILE, OFFLINE_RUN_FILE, Tracker, TrackingConfig, replay

from sonosynth.launch.pipeline.config import STATE, REPLACED, PipelineConfig
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
        run_id = record.get("run_id") if record.get("uri") == self.uri else None
        tracking = self._tracking(run_name=self.cfg.name or "pipeline",
                                  tags={**self.cfg.tracking.tags, "sonosynth.pipeline": self.cfg.name or "pipeline",
                                        "sonosynth.pipeline_id": self.pkey})
        self.parent = Tracker(tracking, offline_dir=self._parent_offline_dir(),
                              experiment=self.experiment, run_id=run_id)
        self.parent.start(tags={"sonosynth.stage": "pipeline", "sonosynth.out": self.root})
        if self.parent.run_id and self.parent.run_id != run_id:
            self.storage.put_text(record_key, json.dumps({"run_id": self.parent.run_id, "uri": self.uri}))
        self.parent.log_params({f"key.{s.section}": s.key or "not run" for s in self.steps})
        self.parent.log_params({f"source.{s.section}": f"{s.source['digest']} ({s.source['files']} files)"
                                for s in self.steps if s.source})

    def _stage_tags(self, step: Step) -> dict[str, str]:
        tags = {"sonosynth.pipeline": self.cfg.name or "pipeline", "sonosynth.pipeline_id": self.pkey,
                "sonosynth.pipeline_section": step.section, "sonosynth.pipeline_key": step.key}
        if step.source:
            tags.update({"sonosynth.source_fingerprint": step.source["digest"],
                         "sonosynth.source_files": str(step.source["files"]),
                         "sonosynth.source": str(step.source["uri"])})
        return tags

    def replay_offline(self) -> None:
        """Deliver what earlier runs could not (their parent runs first, then the stages' records
        nested under them). Only local outputs keep such records where the pipeline finds them."""
        if not self.cfg.tracking.enabled or not _is_local(self.root) or not Path(self.root).is_dir():
            return
        root = Path(self.root)
        pending = [p.parent for p in root.rglob(f"tracking-offline/{OFFLINE_FILE}") if f"/{REPLACED}/" not in str(p)]
        if not pending:
            return
        parents = [p for p in pending if p.parent.parent.name == STATE]
        print(f"replaying the tracking records of {len(pending)} runs that MLflow could not take earlier", flush=True)
        try:
            for folder in parents:
                pkey = folder.parent.name
                run_id = replay(folder, self._tracking())
                record = root / STATE / pkey / "run.json"
                old = json.loads(record.read_text()) if record.is_file() else {}
                if not old.get("run_id") or old.get("uri") != self.uri:
                    record.write_text(json.dumps({"run_id": run_id, "uri": self.uri}))
            for folder in pending:
                if folder in parents:
                    continue
                how = folder / OFFLINE_RUN_FILE
                tags = json.loads(how.read_text()).get("tags", {}) if how.is_file() else {}
                record = root / STATE / tags.get("sonosynth.pipeline_id", "-") / "run.json"
                parent = json.loads(record.read_text()).get("run_id") if record.is_file() else None
                replay(folder, self._tracking(parent_run_id=parent))
        except ConnectionError as err:
            log.warning("MLflow at %s is still unreachable (%s); the records stay for the next run", self.uri,
                        _first_lines(err))
        except Exception as err:  # noqa: BLE001 - tracking never stops the pipeline
            log.warning("replaying tracking records failed (%s); they stay for the next run", _first_lines(err))

    # -- one stage ----------------------------------------------------------------------------

    def _mark_failed(self, step: Step, err: BaseException, started: float) -> None:
        """The stage's own run FAILED with the error; or, if it never opened one, a FAILED run."""
        if not self.cfg.tracking.enabled:
            return
        error = _first_lines(err)[:4900]
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
