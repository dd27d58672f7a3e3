"""``sonosynth pipeline``: the stages as one nightly run, each skipped when its output exists.

A pipeline recipe names its stages in order under ``stages:``; each section is one stage's
recipe fragment plus three pipeline fields:

- ``stage``: the stage it runs (``ingest``, ``train-lora``, ``generate``, ``train-sam``,
  ``train-classifier``, ``evaluate``, ``promote``, ...; ``sonosynth config`` lists them);
- ``recipe`` (optional): a shipped recipe or YAML path underneath the section's fields
  (defaults < recipe < section < ``--set``);
- ``if_exists`` (optional): run the section only when this path exists (e.g. real samples).

Inputs are wired with expressions: ``${SECTION.out}`` (that section's output folder),
``${SECTION.outputs.NAME}``, ``${SECTION.tracking.version}`` and any other field of its
report (``Report``: ``outputs``, ``figures``, ``tracking``), ``${SECTION.key}``; and the
built-ins ``${out}`` (the pipeline's folder), ``${shared_data}`` ($SONOSYNTH_SHARED_DATA,
else ``../shared/data`` beside the checkout) and ``${env:NAME}`` / ``${env:NAME|default}``.
A section may refer only to sections above it. When a referenced section is not run (its
``if_exists`` path is missing), the mapping holding the reference is left out of its parent
(e.g. one source of a training mix), a list item holding it is left out, and a section
that refers to it by a top-level field is not run either.

Every section writes to ``OUT/<section>/<key>``. The key is a hash of the stage and its
resolved config (defaults filled in, minus ``out``, ``tracking``, ``progress``, ``ray``,
``storage``, ``workers``), where every reference to another section stands for that
section's key, so a change upstream changes every key downstream. A stage that reads data
from outside (an ingest's source folder or ``s3://`` prefix) adds its source's fingerprint
(``datasets/source.py``: names, sizes, ETags or modification times) to its key, so new,
changed or removed source files re-run it and everything after it. A section whose folder
holds ``_PIPELINE_DONE.json`` (its report, written after it succeeded) is skipped: a killed
or failed pipeline resumes where it stopped (the interrupted stage resumes itself), a
re-run with nothing changed does nothing, and changing one section re-runs it and the
sections that depend on it only. ``from_stage`` re-runs a section and every later one,
``only`` one section (their old folders are set aside under ``OUT/<section>/_replaced/``).

One pipeline at a time writes OUT: the run takes a lease (``infra/lease.py``) on
``OUT/_pipeline/lease.json`` and renews it while it runs; a second run into the same OUT
exits 1 naming the holder, and the lease of a run that died expires after ``lease.ttl_s``.

One MLflow run (experiment ``tracking.experiment``, default ``sonosynth-pipeline``) is the
parent of one nested run per stage that ran; every stage is tracked in the pipeline's store.
A resumed pipeline reopens its parent run. The lineage table (section, stage, status, key,
inputs, outputs, MLflow run, model version) goes to ``lineage.csv``, ``lineage.md``,
``pipeline.json`` and ``report.html`` in OUT, and to the parent run. A failing stage marks
its nested run and the parent FAILED and raises ``PipelineFailed`` (one line: the stage,
the error, how to resume). With the tracking server down the pipeline goes on (each
tracker keeps its records in a ``tracking-offline`` folder); the next pipeline run that
reaches the server replays them, nested under their parent run.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import model_validator

from sonosynth.infra.config import Config, ConfigError, apply_overrides, build, flatten, merge
from sonosynth.infra.jobdir import fingerprint, offline_dir_for
from sonosynth.infra.lease import Lease
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import StorageConfig, StorageError, open_storage
from sonosynth.infra.tracking import OFFLINE_FILE, OFFLINE_RUN_FILE, Tracker, TrackingConfig, replay

log = logging.getLogger(__name__)
DONE = "_PIPELINE_DONE.json"
STATE = "_pipeline"
LEASE_KEY = f"{STATE}/lease.json"
REPLACED = "_replaced"
SECTION_FIELDS = ("stage", "recipe", "if_exists")
KEY_EXCLUDED = ("out", "tracking", "progress", "ray", "storage", "workers", "overwrite",
                "engine.progress", "engine.loader_workers", "engine.prefetch")
"""Fields that do not change what a stage delivers, left out of its key."""
EXPERIMENT = "sonosynth-pipeline"
_REF = re.compile(r"\$\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
BUILTINS = ("out", "shared_data")


class PipelineFailed(StageFailed):
    """A stage of the pipeline failed; the message is one line: the stage, the error, the fix."""

    def __init__(self, message: str, section: str, stage: str):
        super().__init__(message)
        self.section, self.stage = section, stage


class PipelineReportConfig(Config):
    """What report.html shows besides the lineage table."""

    grid: str | None = None
    """Section whose `grid` output is the synthetic pair grid (null: the first generate section)."""
    compare: dict[str, list[str]] = {}
    """Dice before/after synthetic data: label -> evaluate sections (one per cohort), e.g.
    {real only: [eval_base], real + synthetic: [eval_synthetic]}; sections not run are left out."""
    metric: str = "dice_mean"
    """The figure compared per cohort (box_baseline_<metric> is shown beside it when present)."""
    promote: str | None = None
    """Section whose promotion decision is shown (null: the first promote section)."""


class LeaseConfig(Config):
    """One pipeline at a time into one output: a lease on OUT/_pipeline/lease.json."""

    enabled: bool = True
    """Take the lease before running (off: two runs into one OUT can overwrite each other)."""
    ttl_s: float = 900.0
    """Seconds a lease lives without renewal; a live run renews it every ttl_s/3, so a run whose
    process died frees its output at most this long after. Must exceed any stall of the driver."""

    @model_validator(mode="after")
    def _check(self) -> "LeaseConfig":
        if self.ttl_s < 3:
            raise ValueError(f"lease.ttl_s={self.ttl_s}: give at least 3 seconds (default 900)")
        return self


class PipelineConfig(Config):
    """``sonosynth pipeline``: stages in order, wired by ${...} expressions, skipped when done."""

    out: str = "runs/pipeline"
    """Folder (or s3:// prefix) of everything: OUT/<section>/<key> per stage, report.html,
    lineage.csv/.md, pipeline.json (and mlflow.db when tracking.uri is null)."""
    stages: dict[str, dict[str, Any] | None]
    """Section name -> that stage's recipe fragment with `stage: NAME` (and optional `recipe`,
    `if_exists`), in run order; ${SECTION.out} etc. wire one section's outputs into another.
    A section set to null is not run (nor are the sections that need it)."""
    tracking: TrackingConfig = TrackingConfig()
    """The one MLflow store of every stage (null uri: $MLFLOW_TRACKING_URI, else sqlite at
    OUT/mlflow.db) and the parent run's experiment (default sonosynth-pipeline)."""
    report: PipelineReportConfig = PipelineReportConfig()
    """What report.html shows."""
    from_stage: str | None = None
    """Re-run this section and every section after it (the earlier ones must have finished)."""
    only: str | None = None
    """Re-run this section alone (the sections it reads must have finished)."""
    name: str | None = None
    """The pipeline's name: the parent run's name and the report's title (default: the recipe's)."""
    progress: bool = True
    """Show the stages' progress bars (the pipeline always prints one line per stage)."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the output storage."""
    lease: LeaseConfig = LeaseConfig()
    """The output's lease: a second pipeline into the same OUT exits 1 naming the holder."""

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        if not self.stages:
            raise ValueError("stages is empty; give at least one section, e.g. {real: {stage: ingest}}")
        names = list(self.stages)
        for i, (section, data) in enumerate(self.stages.items()):
            if not _NAME.match(section) or section in BUILTINS:
                raise ValueError(f"section name {section!r}: use letters, digits, _ and -, starting with a letter "
                                 f"(not {', '.join(BUILTINS)})")
            if data is None:
                continue
            if not isinstance(data, dict) or not isinstance(data.get("stage"), str):
                raise ValueError(f"stages.{section} needs `stage: NAME` (one of `sonosynth config`'s stages)")
            for ref in _refs(data):
                head = ref.split(".", 1)[0]
                if ref in BUILTINS or ref.startswith("env:"):
                    continue
                if head not in self.stages:
                    raise ValueError(f"stages.{section}: ${{{ref}}} names no section; sections: {', '.join(names)}; "
                                     f"built-ins: ${{out}}, ${{shared_data}}, ${{env:NAME}}")
                if names.index(head) >= i:
                    raise ValueError(f"stages.{section}: ${{{ref}}} refers to a section that runs later; a section "
                                     f"reads only the sections above it")
                if "." not in ref:
                    raise ValueError(f"stages.{section}: ${{{ref}}} needs a field, e.g. ${{{head}.out}} or "
                                     f"${{{head}.outputs.model}}")
        for flag in ("from_stage", "only"):
            if getattr(self, flag) is not None and getattr(self, flag) not in self.stages:
                raise ValueError(f"{flag}={getattr(self, flag)!r} names no section; sections: {', '.join(names)}")
        if self.from_stage and self.only:
            raise ValueError("give from_stage or only, not both")
        for label, sections in self.report.compare.items():
            unknown = [s for s in sections if s not in self.stages]
            if unknown:
                raise ValueError(f"report.compare.{label} names no section {unknown}")
        return self

    def root(self) -> str:
        """``out`` without a trailing slash; a local folder made absolute (Ray workers run elsewhere)."""
        return self.out.rstrip("/") if "://" in self.out else str(Path(self.out).expanduser().resolve())

    def tracking_uri(self) -> str:
        """The store every stage writes to: tracking.uri, $MLFLOW_TRACKING_URI, else OUT/mlflow.db."""
        if self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "://" in self.out:
            return self.tracking.resolved_uri()
        return f"sqlite:///{(Path(self.out) / 'mlflow.db').resolve()}"


def resolve_pipeline(recipe: str, flags: dict[str, Any], overrides: Iterable[str]) -> PipelineConfig:
    """defaults < recipe < flags < --set. ``--set SECTION.key=v`` is short for ``stages.SECTION.key=v``."""
    from sonosynth.launch.recipes import find_recipe, load_recipe, prune

    path = find_recipe(recipe)
    data = merge(load_recipe(path), prune(flags))
    sections = set(data.get("stages") or {})
    fixed = []
    for item in overrides:
        head = item.partition("=")[0].strip().split(".", 1)[0]
        fixed.append(f"stages.{item}" if head in sections and head not in PipelineConfig.model_fields else item)
    source = str(path)
    if fixed:
        data = apply_overrides(data, fixed)
        source += " + --set " + " ".join(fixed)
    data.setdefault("name", path.stem)
    return build(PipelineConfig, data, source)


# -- expressions --------------------------------------------------------------------------------

class _Drop:
    """A reference to a section that is not run."""


DROP = _Drop()
KEEP = object()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return _REF.findall(node) if isinstance(node, str) else []


def _walk(node: Any, lookup: Callable[[str, str], Any], path: str = "") -> Any:
    """Substitute every ${ref} (``lookup(ref, path)`` -> value, KEEP or DROP), with the DROP rules
    of the module docstring."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            new = _walk(v, lookup, f"{path}.{k}" if path else str(k))
            if new is DROP:
                if isinstance(v, dict):
                    continue
                return DROP
            out[k] = new
        return out
    if isinstance(node, list):
        items = [_walk(v, lookup, f"{path}[{i}]") for i, v in enumerate(node)]
        return [v for v in items if v is not DROP]
    if not isinstance(node, str) or "${" not in node:
        return node
    whole = _REF.fullmatch(node)
    if whole:
        value = lookup(whole.group(1), path)
        return node if value is KEEP else value
    dropped = False

    def repl(m: re.Match) -> str:
        nonlocal dropped
        value = lookup(m.group(1), path)
        if value is DROP:
            dropped = True
            return ""
        return m.group(0) if value is KEEP else str(value)

    text = _REF.sub(repl, node)
    return DROP if dropped else text


def shared_data_dir() -> Path:
    """$SONOSYNTH_SHARED_DATA, else the first existing ../shared/data beside the working folder
    or the checkout (what tests/conftest.py uses)."""
    env = os.environ.get("SONOSYNTH_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]
    return next((c.resolve() for c in candidates if c.is_dir()), candidates[0].resolve())


def _builtin(ref: str, root: str) -> Any:
    if ref == "out":
        return root
    if ref == "shared_data":
        return str(shared_data_dir())
    if ref.startswith("env:"):
        name, _, default = ref[4:].partition("|")
        value = os.environ.get(name)
        if value is None and not _:
            raise ConfigError(f"${{{ref}}}: ${name} is not set; set it, or give a default as ${{env:{name}|value}}")
        return value if value is not None else default
    return KEEP


def _excluded(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in KEY_EXCLUDED)


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _exists(path: str) -> bool:
    if _is_local(path):
        return Path(path).expanduser().exists()
    try:
        return bool(open_storage(path).list(""))
    except Exception:  # noqa: BLE001 - unreachable counts as missing
        return False


# -- the plan -----------------------------------------------------------------------------------

@dataclass
class Step:
    section: str
    stage: str
    index: int
    data: dict[str, Any]
    """The section's fields: recipe < section, built-ins substituted, ${SECTION...} kept."""
    key: str = ""
    out: str = ""
    skip: str | None = None
    """Why the section is not run (its if_exists path is missing, or it reads one that is not run)."""
    source: dict[str, Any] | None = None
    """The fingerprint of what the stage reads from outside the pipeline (an ingest's source
    listing), part of its key; None when it reads nothing outside."""

    @property
    def uses(self) -> list[str]:
        return sorted({r.split(".", 1)[0] for r in _refs(self.data)} - set(BUILTINS))


def _stage(name: str):
    """A stage of the registry; ``promote`` is found here until the registry lists it."""
    from sonosynth.launch.stages import STAGES, Stage, get_stage

    if name == "promote" and name not in STAGES:
        def load():
            from sonosynth.launch.promote import PromoteConfig, run

            return PromoteConfig, run

        return Stage("promote", "score a new model version against the champion; move the aliases", load)
    return get_stage(name)


def plan(cfg: PipelineConfig) -> list[Step]:
    """Every section's key and folder, and which sections are not run; validates every stage's
    config before anything runs (a ConfigError names the section and the key)."""
    from sonosynth.launch.recipes import find_recipe, load_recipe

    root = cfg.root()
    steps: dict[str, Step] = {}
    for index, (section, raw) in enumerate(cfg.stages.items()):
        if raw is None:
            steps[section] = Step(section, "-", index, {}, skip="disabled (null in the recipe)")
            continue
        raw = dict(raw)
        stage_name = raw.pop("stage")
        recipe, if_exists = raw.pop("recipe", None), raw.pop("if_exists", None)
        try:
            stage = _stage(stage_name)
        except ConfigError as err:
            raise ConfigError(f"stages.{section}: {err}") from None
        data = merge(load_recipe(find_recipe(str(recipe))), raw) if recipe else raw
        data = _walk(data, lambda ref, _p: _builtin(ref, root))
        step = Step(section, stage_name, index, data)
        steps[section] = step
        if if_exists is not None:
            where = _walk(if_exists, lambda ref, _p: _builtin(ref, root))
            if not _exists(str(where)):
                step.skip = f"if_exists: {where} is missing"
                continue

        def for_key(ref: str, _path: str) -> Any:
            head = ref.split(".", 1)[0]
            if head not in steps:
                return KEEP
            up = steps[head]
            return DROP if up.skip else f"${{{ref}}}@{up.key}"

        probe = _walk(data, for_key)
        if probe is DROP:
            step.skip = "it reads " + ", ".join(s for s in step.uses if steps[s].skip) + ", which is not run"
            continue
        fields = stage.config_class.model_fields
        if "out" in fields:
            probe["out"] = f"{root}/{section}/_"
        resolved = build(stage.config_class, probe, f"pipeline section {section} (stage {stage_name})")
        identity: dict[str, Any] = {k: v for k, v in flatten(resolved.to_dict()).items() if not _excluded(k)}
        step.source = _source_fingerprint(section, resolved)
        if step.source is not None:
            identity["source"] = step.source["digest"]
        step.key = fingerprint({"stage": stage_name, "config": identity})[:12]
        step.out = f"{root}/{section}/{step.key}"
    return list(steps.values())


def _source_fingerprint(section: str, cfg: Config) -> dict[str, Any] | None:
    """A stage config that reads data from outside the pipeline says what it holds now."""
    method = getattr(cfg, "source_fingerprint", None)
    if method is None:
        return None
    try:
        return method()
    except (FileNotFoundError, StorageError) as err:
        raise ConfigError(f"stages.{section}: cannot list its source: {err}") from None


def pipeline_key(steps: list[Step]) -> str:
    return fingerprint({s.section: s.key for s in steps if not s.skip})[:12]


# -- running ------------------------------------------------------------------------------------

def echo(text: str) -> None:
    print(text, flush=True)


def _first_lines(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines()[:4] if line.strip())
    text = text or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _numbers(figures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in figures.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[prefix + k] = float(v)
    return out


class Run:
    """One invocation of a pipeline: the plan, the parent run, the stages in order."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.root = cfg.root()
        self.storage = open_storage(self.root, cfg.storage)
        self.steps = plan(cfg)
        self.by_name = {s.section: s for s in self.steps}
        self.pkey = pipeline_key(self.steps)
        self.uri = cfg.tracking_uri()
        self.experiment = cfg.tracking.experiment or EXPERIMENT
        self.reports: dict[str, dict[str, Any]] = {}
        self.inputs: dict[str, dict[str, Any]] = {}
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.parent: Tracker | None = None
        self.failure: str | None = None

    # -- tracking ---------------------------------------------------------------------------
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
        echo(f"replaying the tracking records of {len(pending)} runs that MLflow could not take earlier")
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
        stage = _stage(step.stage)
        fields = stage.config_class.model_fields
        self.inputs[step.section] = {}
        data = _walk(step.data, self._lookup(step))
        if "out" in fields:
            data["out"] = step.out
        if "tracking" in fields:
            own = dict(data.get("tracking") or {})
            tr = {**self.cfg.tracking.model_dump(exclude={"uri", "experiment", "run_name", "tags", "parent_run_id",
                                                          "registered_model"}), **own}
            tr.update(uri=self.uri, experiment=self.experiment,
                      enabled=bool(own.get("enabled", True)) and self.cfg.tracking.enabled,
                      parent_run_id=self.parent.run_id if self.parent else None,
                      tags={**(own.get("tags") or {}), **self._stage_tags(step)})
            tr.setdefault("run_name", step.section)
            data["tracking"] = tr
        if not self.cfg.progress:
            if "progress" in fields:
                data["progress"] = False
            if "engine" in fields:
                data["engine"] = {**(data.get("engine") or {}), "progress": False}
        return build(stage.config_class, data, f"pipeline section {step.section} (stage {step.stage})")

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
        for step in self.steps:  # what a selected section reads must have finished
            if step.skip or step.section in runnable:
                continue
            done = self._done(step)
            if done is not None:
                self.reports[step.section] = done["report"]
                self.inputs[step.section] = done.get("inputs", {})
            needed_by = [s.section for s in self.steps if s.section in runnable and step.section in s.uses]
            if done is None and needed_by:
                flag = "--only" if self.cfg.only else "--from"
                raise ConfigError(f"{flag}: {', '.join(needed_by)} reads section {step.section}, which has not "
                                  f"finished ({self.root}/{step.section}/{step.key} holds no {DONE}); run the "
                                  f"pipeline without {flag} first")
        if self.cfg.tracking.enabled:
            import mlflow

            # One store for every stage: models:/ URIs resolve through the process-wide registry.
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)
            self.replay_offline()
            self._open_parent()
        previous = _raise_on_sigterm()
        total = len(self.steps)
        echo(f"pipeline {self.cfg.name or ''} -> {self.root} ({total} sections; MLflow at {self.uri})")
        try:
            for i, step in enumerate(self.steps, 1):
                head = f"[{i}/{total}] {step.section} ({step.stage})"
                if lease is not None:
                    lease.check()
                if step.skip:
                    self.status[step.section] = f"not run: {step.skip}"
                    echo(f"{head}: not run ({step.skip})")
                    continue
                if step.section not in runnable:
                    self.status[step.section] = "skipped (done)" if step.section in self.reports else "not selected"
                    echo(f"{head}: {self.status[step.section]}")
                    continue
                done = self._done(step)
                if done is not None and step.section not in forced:
                    self.reports[step.section] = done["report"]
                    self.inputs[step.section] = done.get("inputs", {})
                    self.status[step.section] = "skipped (done)"
                    echo(f"{head}: done earlier, skipped ({step.out})")
                    continue
                if step.section in forced:
                    self._set_aside(step)
                echo(f"{head}: running -> {step.out}")
                t0 = time.monotonic()
                try:
                    report = self.run_step(step)
                except Exception as err:  # noqa: BLE001 - every failure is reported the same way
                    self.seconds[step.section] = time.monotonic() - t0
                    self._fail(step, err)
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
                echo("\n".join("    " + line for line in report.render().splitlines()))
                echo(f"{head}: finished in {self.seconds[step.section]:.0f} s")
        except KeyboardInterrupt:
            self.failure = "interrupted; re-run the same command to resume"
            self._finish("KILLED")
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self._finish("FINISHED")

    def _fail(self, step: Step, err: BaseException) -> None:
        self.status[step.section] = "failed"
        for later in self.steps[step.index + 1:]:
            self.status.setdefault(later.section, "not run (an earlier stage failed)")
        first = _first_lines(err)
        done = sum(1 for s in self.status.values() if s in ("ran", "skipped (done)"))
        self.failure = (f"stage {step.section} ({step.stage}) failed: {first}; fix that and re-run the same "
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
                counts = {"ran": 0.0, "skipped": 0.0, "failed": 0.0}
                for s in self.status.values():
                    counts["ran" if s == "ran" else "failed" if s == "failed" else "skipped"] += 1
                self.parent.log_metrics({f"pipeline/{k}": v for k, v in counts.items()}, 0)
                self.parent.close(status)
        ran = [s for s, st in self.status.items() if st == "ran"]
        skipped = [s for s, st in self.status.items() if st == "skipped (done)"]
        lines = [f"pipeline {self.cfg.name or ''}: {status.lower()}; ran {len(ran)} stages"
                 f"{' (' + ', '.join(ran) + ')' if ran else ''}, skipped {len(skipped)} already done"]
        lines.append(to_markdown(rows, brief=True).rstrip())
        promo = self.promotion()
        if promo:
            lines.append(f"promotion: {promo.get('model')} version {promo.get('version')}: {promo.get('decision')} "
                         f"(champion: version {promo.get('champion_after')})")
        lines.append(f"results:  {self.root}")
        lines.append(f"report:   {self.root}/report.html")
        lines.append(f"MLflow:   {self.ui_command()}")
        return Report(stage="pipeline", out=self.root, text="\n".join(lines),
                      figures={"status": status, "ran": ran, "skipped": skipped, "pipeline_key": self.pkey,
                               "stages": {r["section"]: {"status": r["status"], "key": r["key"]} for r in rows}},
                      outputs={"report": f"{self.root}/report.html", "lineage": f"{self.root}/lineage.md",
                               "summary": f"{self.root}/pipeline.json"},
                      tracking={"uri": self.uri, "run_id": self.parent.run_id if self.parent else None,
                                "offline": bool(self.parent and self.parent.offline)},
                      failed=self.failure)

    # -- what it produced ---------------------------------------------------------------------
    def lineage(self) -> list[dict[str, Any]]:
        rows = []
        for step in self.steps:
            rep = self.reports.get(step.section) or {}
            tr = rep.get("tracking") or {}
            model = f"{tr['registered_model']} v{tr['version']}" if tr.get("registered_model") and tr.get("version") \
                else ""
            rows.append({
                "section": step.section, "stage": step.stage,
                "status": self.status.get(step.section, "not run"), "key": step.key,
                "inputs": "; ".join(f"{k}={v}" for k, v in (self.inputs.get(step.section) or {}).items()),
                "outputs": "; ".join(f"{k}={v}" for k, v in (rep.get("outputs") or {}).items()),
                "source": f"{step.source['digest']} ({step.source['files']} files)" if step.source else "",
                "mlflow_run": tr.get("run_id") or "", "model_version": model,
                "seconds": round(self.seconds[step.section], 1) if step.section in self.seconds else "",
            })
        return rows

    def promotion(self) -> dict[str, Any] | None:
        name = self.cfg.report.promote or next((s.section for s in self.steps if s.stage == "promote"), None)
        rep = self.reports.get(name) if name else None
        return (rep or {}).get("figures") or None

    def summary(self, rows: list[dict[str, Any]], status: str) -> dict[str, Any]:
        return {"name": self.cfg.name, "out": self.root, "status": status, "failed": self.failure,
                "pipeline_key": self.pkey, "tracking": {"uri": self.uri, "experiment": self.experiment,
                                                        "run_id": self.parent.run_id if self.parent else None},
                "stages": rows, "promotion": self.promotion(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def ui_command(self) -> str:
        if self.uri.startswith("sqlite:///"):
            exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
            try:
                exe = str(Path(exe).relative_to(Path.cwd()))
            except ValueError:
                pass
            return f"{exe} ui --backend-store-uri {self.uri}  (then open http://127.0.0.1:5000)"
        if self.uri.startswith("http"):
            run_id = self.parent.run_id if self.parent else None
            return f"open {self.uri.rstrip('/')}" + (f"/#/runs/{run_id}" if run_id else "")
        return f"mlflow ui --backend-store-uri {self.uri}"


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


# -- tables and the HTML report -----------------------------------------------------------------

COLUMNS = ("section", "stage", "status", "key", "source", "inputs", "outputs", "mlflow_run", "model_version",
           "seconds")


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], brief: bool = False) -> str:
    columns = ("section", "stage", "status", "key", "model_version") if brief else COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _read_bytes(uri: str) -> bytes | None:
    folder, _, name = uri.rstrip("/").rpartition("/")
    try:
        return open_storage(folder or ".").get_bytes(name)
    except Exception:  # noqa: BLE001 - a missing image leaves a note in the report
        return None


def _f(v: Any) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _table(table_id: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_f(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _grid_section(r: Run) -> str:
    name = r.cfg.report.grid or next((s.section for s in r.steps if s.stage == "generate"), None)
    rep = r.reports.get(name) if name else None
    grid = (rep or {}).get("outputs", {}).get("grid")
    data = _read_bytes(grid) if grid else None
    if not data:
        return "<p>No synthetic pair grid: no generate section has finished.</p>"
    figures = rep.get("figures") or {}
    note = (f"{figures.get('accepted', figures.get('num_samples', ''))} samples from section {name}; "
            f"acceptance {_f(figures.get('acceptance_rate'))}") if figures else f"section {name}"
    return (f'<img id="synthetic-grid" alt="synthetic image+mask pairs" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}"><p>{html.escape(note)} ({html.escape(grid)})</p>')


def _dice_section(r: Run) -> str:
    metric = r.cfg.report.metric
    labels = {label: [s for s in sections if s in r.reports] for label, sections in r.cfg.report.compare.items()}
    labels = {k: v for k, v in labels.items() if v}
    if not labels:
        return "<p>No comparison: the recipe's report.compare names no evaluate section that has finished.</p>"
    cells: dict[str, dict[str, tuple[Any, Any, Any]]] = {}
    for label, sections in labels.items():
        for section in sections:
            figures = r.reports[section].get("figures") or {}
            for cohort, f in (figures.get("by_cohort") or {"all": figures}).items():
                cells.setdefault(cohort, {})[label] = (f.get(metric), f.get(f"box_baseline_{metric}"),
                                                       f.get("n_images"))
    names = list(labels)
    header = ["cohort", "images"] + [f"{metric}: {label}" for label in names]
    if len(names) > 1:
        header.append(f"change ({names[-1]} - {names[0]})")
    header.append(f"box baseline {metric}")
    rows = []
    for cohort, by_label in sorted(cells.items()):
        values = [by_label.get(label, (None, None, None))[0] for label in names]
        row = [cohort, next((v[2] for v in by_label.values() if v[2] is not None), None), *values]
        if len(names) > 1:
            row.append(values[-1] - values[0] if values[-1] is not None and values[0] is not None else None)
        row.append(next((v[1] for v in by_label.values() if v[1] is not None), None))
        rows.append(row)
    return _table("dice-table", header, rows)


def _promotion_section(r: Run) -> str:
    d = r.promotion()
    if not d:
        return "<p>No promotion: the recipe has no promote section, or it has not finished.</p>"
    if d.get("deferred"):
        return f'<p id="promotion-decision">deferred: {html.escape(str(d.get("reason")))}</p>'
    lines = [f'<p id="promotion-decision"><b>{html.escape(str(d.get("decision")))}</b>: '
             f'{html.escape(str(d.get("model")))} version {html.escape(str(d.get("version")))}; champion is now '
             f'version {html.escape(str(d.get("champion_after")))}.</p>',
             f"<p>{html.escape(str(d.get('reason', '')))}</p>"]
    ch, cp = d.get("challenger") or {}, d.get("champion") or {}
    rows = []
    checks = {c["check"]: c for c in d.get("checks") or []}
    for name, value in (ch.get("overall") or {}).items():
        c = checks.get(name, {})
        rows.append([name, value, (cp.get("overall") or {}).get(name), c.get("rule", ""),
                     "" if not c else "yes" if c.get("ok") else "NO"])
    for cohort, values in (ch.get("by_cohort") or {}).items():
        for name, value in values.items():
            c = checks.get(f"{name}/{cohort}", {})
            rows.append([f"{name} ({cohort})", value, ((cp.get("by_cohort") or {}).get(cohort) or {}).get(name),
                         c.get("rule", ""), "" if not c else "yes" if c.get("ok") else "NO"])
    header = ["figure", f"challenger (v{d.get('version')})",
              f"champion (v{d.get('champion_before')})" if d.get("champion_before") else "champion (none)",
              "rule", "passes"]
    lines.append(_table("promotion-table", header, rows))
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td{word-break:break-all}img{max-width:100%}
.FAILED{color:#b00}.FINISHED{color:#070}pre{background:#f6f6f6;padding:.6em}"""


def render_html(r: Run, rows: list[dict[str, Any]], status: str) -> str:
    """report.html: self-contained (the grid is inlined), plain HTML, no scripts."""
    title = html.escape(f"sonosynth pipeline {r.cfg.name or ''}")
    run_id = r.parent.run_id if r.parent else None
    lineage = _table("lineage-table", list(COLUMNS), [[row[c] for c in COLUMNS] for row in rows])
    failure = f'<p class="FAILED">{html.escape(r.failure)}</p>' if r.failure else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head><body>
<h1>{title}</h1>
<p>Status: <b class="{status}" id="status">{status}</b>; output {html.escape(r.root)};
MLflow run {html.escape(run_id or 'none')} at {html.escape(r.uri)};
written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>
{failure}
<h2 id="synthetic">Synthetic image+mask pairs</h2>
{_grid_section(r)}
<h2 id="dice">Dice before and after synthetic data</h2>
{_dice_section(r)}
<h2 id="promotion">Promotion</h2>
{_promotion_section(r)}
<h2 id="lineage">Lineage</h2>
<p>One row per section: its key (a hash of its config, of its inputs' keys and, for an ingest,
of its source listing: the source column), what it read and
wrote, its MLflow run and the model version it registered.</p>
{lineage}
<h2 id="open">Open in MLflow</h2>
<pre>{html.escape(r.ui_command())}</pre>
</body></html>
"""


__all__ = ["LeaseConfig", "PipelineConfig", "PipelineFailed", "PipelineReportConfig", "Run", "Step", "pipeline_key",
           "plan", "resolve_pipeline", "run", "shared_data_dir"]
