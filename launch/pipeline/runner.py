"""Running a plan: sections in order, markers, forced re-runs set aside, signals, the lease."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable


from sonosynth.infra.config import Config, ConfigError
from sonosynth.infra.console import LogFolder, logs_to
from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.secrets import redact_uri
from sonosynth.infra.lease import Lease
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import open_storage
from sonosynth.infra.tracking import Tracker

from sonosynth.launch.pipeline.child import child_config
from sonosynth.launch.pipeline.config import DONE, LEASE_KEY, REPLACED, EXPERIMENT, PipelineConfig, PipelineFailed
from sonosynth.launch.pipeline.expressions import DROP, KEEP, _walk
from sonosynth.launch.pipeline.gate import Gate, read_gate
from sonosynth.launch.pipeline.plan import Step, _is_local, _stage, pipeline_key, plan
from sonosynth.launch.pipeline.report import RunReport, render_html, to_csv, to_markdown
from sonosynth.launch.pipeline.report_quality import gate_effect
from sonosynth.launch.pipeline.tracking import RunTracking, _first_lines

log = logging.getLogger(__name__)



def echo(text: str) -> None:
    print(text, flush=True)


def _numbers(figures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in figures.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[prefix + k] = float(v)
    return out


class Run(RunTracking, RunReport):
    """One invocation of a pipeline: the plan, the parent run, the stages in order."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.root = cfg.root()
        self.storage = open_storage(self.root, cfg.storage)
        self.steps = plan(cfg)
        self.by_name = {s.section: s for s in self.steps}
        self.pkey = pipeline_key(self.steps)
        self.planned_keys = {s.section: s.key for s in self.steps}
        """The keys before any gate acted: the parent run's params, the same on every resume."""
        self.gates: dict[str, Gate] = {}
        """The failed gates acted on (quality section -> its gate): the plan's ``gates``."""
        self.gate_results: dict[str, Gate] = {}
        """Every gate read, passed or failed."""
        self.uri = cfg.tracking_uri()
        self.experiment = cfg.tracking.experiment or EXPERIMENT
        self.reports: dict[str, dict[str, Any]] = {}
        self.inputs: dict[str, dict[str, Any]] = {}
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.parent: Tracker | None = None
        self.failure: str | None = None

    # -- tracking ---------------------------------------------------------------------------

    def _lookup(self, step: Step) -> Callable[[str, str], Any]:
        def lookup(ref: str, path: str) -> Any:
            head, _, rest = ref.partition(".")
            if head not in self.by_name:
                return KEEP
            up = self.by_name[head]
            if up.skip:
                return DROP
            if rest == "out":
                value: Any = up.out
            elif rest == "key":
                value = up.key
            else:
                value = self.reports.get(head)
                for part in rest.split("."):
                    if not isinstance(value, dict) or part not in value:
                        have = ", ".join(sorted(self.reports.get(head, {}).get(rest.split('.')[0]) or {}))
                        raise ConfigError(f"stages.{step.section}: ${{{ref}}}: section {head} reported no {rest} "
                                          f"({rest.split('.')[0]} has: {have or 'nothing'})")
                    value = value[part]
            self.inputs.setdefault(step.section, {})[path] = value
            return value

        return lookup

    def stage_config(self, step: Step) -> Config:
        self.inputs[step.section] = {}
        data = _walk(step.data, self._lookup(step))
        own = dict(data.get("tracking") or {})
        tracking = {**self.cfg.tracking.model_dump(exclude={"uri", "experiment", "run_name", "tags", "parent_run_id",
                                                            "registered_model"}), **own,
                    "uri": self.uri, "experiment": self.experiment,
                    "enabled": bool(own.get("enabled", True)) and self.cfg.tracking.enabled,
                    "parent_run_id": self.parent.run_id if self.parent else None,
                    "tags": {**(own.get("tags") or {}), **self._stage_tags(step)},
                    "run_name": own.get("run_name") or step.section}
        return child_config(_stage(step.stage).config_class, data, out=step.out, tracking=tracking,
                            progress=self.cfg.progress, source=f"pipeline section {step.section} (stage {step.stage})")

    def _done(self, step: Step) -> dict[str, Any] | None:
        key = f"{step.section}/{step.key}/{DONE}"
        return json.loads(self.storage.get_text(key)) if self.storage.exists(key) else None

    def _set_aside(self, step: Step) -> None:
        """A forced re-run keeps the old output under OUT/<section>/_replaced/<key>-<time>."""
        src = f"{step.section}/{step.key}"
        keys = self.storage.list(src + "/")
        if not keys:
            return
        dest = f"{step.section}/{REPLACED}/{step.key}-{time.strftime('%Y%m%dT%H%M%S')}"
        if _is_local(self.root):
            (Path(self.root) / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(self.root) / src), str(Path(self.root) / dest))
        else:
            for k in keys:
                self.storage.put_bytes(dest + k[len(src):], self.storage.get_bytes(k))
                self.storage.delete(k)
        echo(f"  the previous output of {step.section} is kept in {self.root}/{dest}")

    def run_step(self, step: Step) -> Report:
        self._parent_back()
        stage = _stage(step.stage)
        cfg = self.stage_config(step)
        own = None
        if "tracking" not in stage.config_class.model_fields and self.cfg.tracking.enabled:
            own = Tracker(self._tracking(parent_run_id=self.parent.run_id if self.parent else None,
                                         run_name=step.section, tags=self._stage_tags(step)),
                          offline_dir=offline_dir_for(step.out), experiment=self.experiment)
            own.start(tags={"sonosynth.stage": step.stage, "sonosynth.out": step.out})
            own.log_params(cfg.flat())
        started = time.time()
        try:
            report = stage.run(cfg)
            if report.failed:
                raise StageFailed(report.failed)
        except Exception as err:
            if own is not None:
                own.log_tags({"sonosynth.error": _first_lines(err)[:4900]})
                own.log_text(traceback.format_exc(), "error.txt")
                own.close("FAILED")
            else:
                self._mark_failed(step, err, started)
            raise
        if own is not None:
            own.log_metrics(_numbers(report.figures), 0)
            own.log_text(report.text, "report.txt")
            own.close("FINISHED")
            report.tracking = {"uri": own.uri, "run_id": own.run_id, "offline": own.offline}
        return report

    def take_gate(self, step: Step, head: str | None = None) -> None:
        """A section whose report carries a gate: a failed one re-plans the sections after it (gate.py),
        one that passes (again) restores them. ``head``: print the decision on that console line."""
        gate = read_gate(step, self.reports.get(step.section) or {})
        if gate is None:
            return
        self.gate_results[step.section] = gate
        acting = gate if gate.acts else None
        if self.gates.get(step.section) != acting:
            if acting is None:
                self.gates.pop(step.section, None)
            else:
                self.gates[step.section] = acting
            self.steps = plan(self.cfg, self.gates, previous=self.steps)
            self.by_name = {s.section: s for s in self.steps}
        if head is not None:
            effect = gate_effect(self, step.section)
            echo(f"{head}: {gate.headline()}{'; ' + effect if effect else ''}")

    def _read_stored_gates(self, forced: set[str]) -> None:
        """Gates of quality sections finished earlier, read back first: the plan every later look-up
        uses (resume, --from, --only, the offline replay) is the one they decided."""
        for i in range(len(self.steps)):
            step = self.steps[i]
            if step.scores is None or step.skip or step.section in forced:
                continue
            done = self._done(step)
            if done is not None:
                self.reports[step.section] = done["report"]
                self.take_gate(step)

    def _section_figures(self, row: dict[str, Any]) -> dict[str, Any]:
        """A section's status and key, and where it wrote (``out``, ``outputs``: what ${SECTION...} reads)."""
        step = self.by_name[row["section"]]
        return {"status": row["status"], "key": row["key"], "out": step.out,
                "outputs": dict((self.reports.get(step.section) or {}).get("outputs") or {})}

    def selected(self) -> tuple[set[str], set[str]]:
        """(sections to run when not done, sections forced to re-run)."""
        names = [s.section for s in self.steps]
        if self.cfg.only:
            return {self.cfg.only}, {self.cfg.only}
        if self.cfg.from_stage:
            later = set(names[names.index(self.cfg.from_stage):])
            return later, later
        return set(names), set()

    def execute(self) -> Report:
        """Run under the output's lease: one pipeline at a time writes OUT."""
        if not self.cfg.lease.enabled:
            return self._execute(None)
        lease = Lease(self.root, LEASE_KEY, ttl_s=self.cfg.lease.ttl_s, storage_config=self.cfg.storage,
                      purpose=f"pipeline {self.cfg.name or ''} into {self.root}")
        with lease.held():
            return self._execute(lease)

    def _execute(self, lease: Lease | None) -> Report:
        runnable, forced = self.selected()
        self._read_stored_gates(forced)
        if self.cfg.tracking.enabled:
            self.replay_offline()  # first: a registration made now is in its section's report below
        for i in range(len(self.steps)):  # what a selected section reads must have finished
            step = self.steps[i]  # a gate read back re-plans what comes after it
            if step.skip or step.section in runnable:
                continue
            done = self._done(step)
            if done is not None:
                self.reports[step.section] = done["report"]
                self.inputs[step.section] = done.get("inputs", {})
                self.take_gate(step)
            needed_by = [s.section for s in self.steps if s.section in runnable and step.section in s.uses]
            if done is None and needed_by:
                flag = "--only" if self.cfg.only else "--from"
                raise ConfigError(f"{flag}: {', '.join(needed_by)} reads section {step.section}, which has not "
                                  f"finished ({self.root}/{step.section}/{step.key} holds no {DONE}); run the "
                                  f"pipeline without {flag} first")
        if self.cfg.tracking.enabled:
            self._open_parent()
        previous = _raise_on_sigterm()
        total = len(self.steps)
        echo(f"pipeline {self.cfg.name or ''} -> {self.root} ({total} sections; MLflow at {redact_uri(self.uri)})")
        try:
            for i in range(total):
                step = self.steps[i]  # re-read: a failed gate re-plans the sections after it
                head = f"[{i + 1}/{total}] {step.section} ({step.stage})"
                if lease is not None:
                    lease.check()
                if step.skip:
                    self.status[step.section] = step.skip if step.gated_by else f"not run: {step.skip}"
                    echo(f"{head}: {step.skip}" if step.gated_by else f"{head}: not run ({step.skip})")
                    continue
                if step.section not in runnable:
                    self.status[step.section] = "skipped (done)" if step.section in self.reports else "not selected"
                    echo(f"{head}: {self.status[step.section]}")
                    self.take_gate(step, head)
                    continue
                done = self._done(step)
                without = (f" without data.sources.{', '.join(step.without)} (gate {step.without_by} failed: "
                           f"{self.gates[step.without_by].decision})") if step.without else ""
                if done is not None and step.section not in forced:
                    self.reports[step.section] = done["report"]
                    self.inputs[step.section] = done.get("inputs", {})
                    self.status[step.section] = "skipped (done)"
                    echo(f"{head}: done earlier{without}, skipped ({step.out})")
                    self.take_gate(step, head)
                    continue
                if step.section in forced:
                    self._set_aside(step)
                echo(f"{head}: running{without} -> {step.out}")
                t0 = time.monotonic()
                try:
                    with logs_to(f"{self.root}/{step.section}/logs", self.cfg.storage) as logs:
                        report = self.run_step(step)
                except Exception as err:  # noqa: BLE001 - every failure is reported the same way
                    self.seconds[step.section] = time.monotonic() - t0
                    self._fail(step, err, logs)
                self.seconds[step.section] = time.monotonic() - t0
                self.reports[step.section] = asdict(report)
                if report.figures.get("deferred"):
                    self.status[step.section] = "deferred"
                    echo(f"{head}: deferred: {report.text}")
                    continue
                self.storage.put_text(f"{step.section}/{step.key}/{DONE}", json.dumps(
                    {"section": step.section, "stage": step.stage, "key": step.key, "report": asdict(report),
                     "inputs": self.inputs.get(step.section, {}), "seconds": self.seconds[step.section],
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1, default=str))
                self.status[step.section] = "ran"
                rendered = report.render() + (f"\nlogs: {logs.where}" if logs.written else "")
                echo("\n".join("    " + line for line in rendered.splitlines()))
                echo(f"{head}: finished in {self.seconds[step.section]:.0f} s")
                self.take_gate(step, head)
        except KeyboardInterrupt:
            self.failure = "interrupted; re-run the same command to resume"
            self._finish("KILLED")
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self._finish("FINISHED")

    def _fail(self, step: Step, err: BaseException, logs: LogFolder) -> None:
        self.status[step.section] = "failed"
        for later in self.steps[step.index + 1:]:
            self.status.setdefault(later.section, "not run (an earlier stage failed)")
        first = _first_lines(err)
        done = sum(1 for s in self.status.values() if s in ("ran", "skipped (done)"))
        where = f" (its logs: {logs.where})" if logs.written else ""
        self.failure = (f"stage {step.section} ({step.stage}) failed{where}: {first}; fix that and re-run the same "
                        f"command to resume ({done} finished stage{'s are' if done != 1 else ' is'} kept and skipped)")
        self.failure = self.failure.replace("\n", " ")
        log.debug("stage %s failed", step.section, exc_info=err)
        if self.parent is not None:
            self.parent.log_tags({"sonosynth.error": self.failure[:4900], "sonosynth.failed_stage": step.section})
        self._finish("FAILED")
        raise PipelineFailed(self.failure, step.section, step.stage) from err

    def _finish(self, status: str) -> Report:
        rows = self.lineage()
        with tempfile.TemporaryDirectory(prefix="sonosynth-pipeline-") as tmp:
            files = {"lineage.csv": to_csv(rows), "lineage.md": to_markdown(rows),
                     "pipeline.json": json.dumps(self.summary(rows, status), indent=1, default=str),
                     "report.html": render_html(self, rows, status)}
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
                self.storage.put_file(name, Path(tmp) / name)
            if self.parent is not None:
                for name in files:
                    self.parent.log_artifact(Path(tmp) / name)
                self.parent.log_text(self.cfg.to_yaml(), "pipeline.yaml")
                counts = {"ran": 0.0, "skipped": 0.0, "failed": 0.0, "gated": 0.0}
                for s in self.status.values():
                    counts["ran" if s == "ran" else "failed" if s == "failed" else "gated"
                           if s.startswith("gated") else "skipped"] += 1
                self.parent.log_metrics({f"pipeline/{k}": v for k, v in counts.items()}, 0)
                self.parent.log_tags({f"sonosynth.gate.{name}": gate.headline()[:4900]
                                      for name, gate in self.gate_results.items()})
                self.parent.close(status)
                self._remember_parent()
                self._adopt_orphans()
        ran = [s for s, st in self.status.items() if st == "ran"]
        skipped = [s for s, st in self.status.items() if st == "skipped (done)"]
        lines = [f"pipeline {self.cfg.name or ''}: {status.lower()}; ran {len(ran)} stages"
                 f"{' (' + ', '.join(ran) + ')' if ran else ''}, skipped {len(skipped)} already done"]
        lines.append(to_markdown(rows, brief=True).rstrip())
        for name, gate in self.gate_results.items():
            effect = gate_effect(self, name)
            lines.append(f"{name}: {gate.headline()}{'; ' + effect if effect else ''}")
        promo = self.promotion()
        if promo:
            lines.append(f"promotion: {promo.get('model')} version {promo.get('version')}: {promo.get('decision')} "
                         f"(champion: version {promo.get('champion_after')})")
        lines.append(f"results:  {self.root}")
        lines.append(f"report:   {self.root}/report.html")
        lines.append(f"MLflow:   {self.ui_command()}")
        return Report(stage="pipeline", out=self.root, text="\n".join(lines),
                      figures={"status": status, "ran": ran, "skipped": skipped, "pipeline_key": self.pkey,
                               "gated": [s.section for s in self.steps if s.gated_by], "gates": self.gate_summary(),
                               "stages": {r["section"]: self._section_figures(r) for r in rows}},
                      outputs={"report": f"{self.root}/report.html", "lineage": f"{self.root}/lineage.md",
                               "summary": f"{self.root}/pipeline.json"},
                      tracking={"uri": redact_uri(self.uri), "run_id": self.parent.run_id if self.parent else None,
                                "offline": bool(self.parent and self.parent.offline)},
                      failed=self.failure)

    # -- what it produced ---------------------------------------------------------------------


def _raise_on_sigterm():
    """SIGTERM (a job's deadline, a drained node) ends the run like Ctrl-C: the parent run is
    marked KILLED and the lineage written. Returns the previous handler (None off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def run(cfg: PipelineConfig) -> Report:
    """Run the pipeline; raises PipelineFailed (one line) when a stage fails."""
    return Run(cfg).execute()
