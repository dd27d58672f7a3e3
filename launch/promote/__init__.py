"""Champion/challenger promotion in the MLflow model registry, and the operators' overrides.

A new model version gets the alias ``challenger``. It becomes ``champion`` only if it beats
the current champion on a fixed evaluation set: both versions are scored by the same
evaluation stage, on the same datasets and split, with the same seed and box draws, and
``PromoteRules`` compare the figures (segmentation: mean Dice by more than ``margin``, and
no cohort's Dice worse than the champion's by more than ``tolerance``; classification:
macro F1 by more than ``margin`` with the AUC guarded by ``tolerance``). The first version
of a model becomes champion. The decision, with both sets of figures, is written as tags on
the challenger's version (``sonosynth.decision``, ``sonosynth.reason``,
``sonosynth.challenger_<figure>``, ``sonosynth.champion_<figure>``), in the promote stage's
own MLflow run and in ``OUT/decision.json``.

Every change of champion (promotion, ``sonosynth promote NAME --version V``) is appended
to the registered model's ``sonosynth.champion_history`` tag and the champion it replaced
keeps the alias ``previous_champion``, so ``sonosynth rollback NAME`` restores it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

from pydantic import model_validator

from sonosynth.infra.config import Config, ConfigError, build, set_dotted
from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import StorageConfig, open_storage
from sonosynth.infra.tracking import Tracker, TrackingConfig

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous_champion"
HISTORY_TAG = "sonosynth.champion_history"
HISTORY_KEEP = 50
EXPERIMENT = "sonosynth-promote"

Figures = dict[str, Any]
"""What a model scored: {"overall": {figure: value}, "by_cohort": {cohort: {figure: value}},
"n_images": n, "runs": [evaluation run ids]}."""


class PromoteRules(Config):
    """When a challenger replaces the champion."""

    metric: str = "dice_mean"
    """The figure the challenger must improve (segmentation: dice_mean; classification: f1_macro)."""
    mode: Literal["max", "min"] = "max"
    """Whether higher (max) or lower (min) figures are better, for the metric and the guards."""
    margin: float = 0.0
    """The challenger's metric must beat the champion's by more than this (0: strictly better)."""
    per_cohort: bool = True
    """Also compare the metric per cohort: no cohort may be worse than the champion's by more
    than tolerance."""
    groups: str = "by_cohort"
    """The evaluation's figure holding the per-cohort figures (segmentation: by_cohort; the
    classifier's evaluation: per_centre)."""
    guards: list[str] = []
    """Further figures that may not be worse than the champion's by more than tolerance
    (classification: [auc_ovr_macro])."""
    tolerance: float = 0.02
    """How much worse a cohort's metric, or a guard, may be before the challenger is refused."""

    @model_validator(mode="after")
    def _check(self) -> "PromoteRules":
        if self.margin < 0 or self.tolerance < 0:
            raise ValueError("margin and tolerance must be 0 or more")
        return self


class PromoteEvaluationConfig(Config):
    """The fixed evaluation set both versions are scored on."""

    stage: str = "evaluate"
    """The stage that scores a model (evaluate for SAM; the classifier's evaluation stage)."""
    datasets: list[str]
    """Datasets (folders or s3:// prefixes) to score on; their cohorts are compared one by one."""
    split: str | None = "test"
    """Split of every dataset to score (null: every sample)."""
    field: str = "model"
    """The evaluation stage's field that takes the model."""
    pass_as: Literal["uri", "folder"] = "uri"
    """uri: hand the stage models:/NAME/VERSION; folder: download the version's files first and
    hand it the local folder."""
    set: dict[str, Any] = {}
    """Further fields of the evaluation stage, dotted keys (e.g. {box_draws: 5, seed: 0})."""

    @model_validator(mode="after")
    def _check(self) -> "PromoteEvaluationConfig":
        if not self.datasets:
            raise ValueError("evaluation.datasets is empty; give the fixed evaluation set, e.g. [runs/hc18]")
        return self


class PromoteConfig(Config):
    """``promote``: score a new model version against the champion and move the aliases."""

    out: str = "runs/promote"
    """Where decision.json and both versions' evaluations go: a folder or s3:// prefix."""
    model: str | None
    """Registered model name, e.g. sonosynth-sam (null: nothing was registered; the promotion
    is deferred)."""
    version: str | None = None
    """The challenger's version (null: the latest version of the model)."""
    evaluation: PromoteEvaluationConfig
    """The fixed evaluation set and the stage that scores it."""
    rules: PromoteRules = PromoteRules()
    """When the challenger replaces the champion."""
    tracking: TrackingConfig = TrackingConfig()
    """The MLflow server (or store) holding the registry; the decision is tracked there too."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the output storage."""
    progress: bool = True
    """Show the evaluations' progress bars."""

    @model_validator(mode="before")
    @classmethod
    def _version_is_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("version"), int):
            data = {**data, "version": str(data["version"])}
        return data


@dataclass
class Decision:
    model: str
    version: str
    decision: str
    """first, promoted, refused, unchanged (already champion), manual, rolled_back."""
    reason: str
    champion_before: str | None = None
    champion_after: str | None = None
    challenger: Figures = field(default_factory=dict)
    champion: Figures = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.champion_after == self.version and self.champion_before != self.version

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "promoted": self.promoted}


# -- the registry -------------------------------------------------------------------------------

def _alias(client, name: str, alias: str) -> str | None:
    """The version holding ``alias``, or None when no version holds it."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags or {}
    try:
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except ValueError:
        return []


def _set_history(client, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))


def _check_version(client, name: str, version: str) -> None:
    try:
        client.get_model_version(name, version)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{name} has no version {version} ({str(err).splitlines()[0][:200]}); "
                          f"list the versions in the MLflow UI or with `mlflow models`") from None


def _crown(client, name: str, version: str, before: str | None) -> None:
    """Make ``version`` champion; the champion it replaces keeps ``previous_champion``."""
    history = _history(client, name)
    if not history and before:
        history = [before]
    client.set_registered_model_alias(name, CHAMPION, version)
    if before and before != version:
        client.set_registered_model_alias(name, PREVIOUS, before)
    _set_history(client, name, [*history, version])


def _tag_decision(client, d: Decision, run_id: str | None) -> None:
    tags = {"sonosynth.decision": d.decision, "sonosynth.reason": d.reason[:4900],
            "sonosynth.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if d.champion_before and d.champion_before != d.version:
        tags["sonosynth.compared_with"] = d.champion_before
    if run_id:
        tags["sonosynth.decision_run"] = run_id
    for role, figures in (("challenger", d.challenger), ("champion", d.champion)):
        for name, value in (figures.get("overall") or {}).items():
            tags[f"sonosynth.{role}_{name}"] = _fmt(value)
        for cohort, values in (figures.get("by_cohort") or {}).items():
            for name, value in values.items():
                tags[f"sonosynth.{role}_{name}/{cohort}"] = _fmt(value)
    for key, value in tags.items():
        client.set_model_version_tag(d.model, d.version, key, value)


def _fmt(value: Any) -> str:
    return "none" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


# -- the decision -------------------------------------------------------------------------------

def compare(challenger: Figures, champion: Figures, rules: PromoteRules) -> tuple[bool, str, list[dict[str, Any]]]:
    """Apply ``rules``: (promote?, the reason in one line, every check with both figures)."""
    sign = 1.0 if rules.mode == "max" else -1.0
    checks: list[dict[str, Any]] = []

    def check(what: str, new: Any, old: Any, need: float, strict: bool) -> None:
        if new is None or old is None:
            checks.append({"check": what, "challenger": new, "champion": old, "ok": new is not None,
                           "rule": "no figure to compare"})
            return
        gain = sign * (float(new) - float(old))
        ok = gain > need if strict else gain >= need
        rule = (f"better by more than {need:g}" if strict else
                f"worse by at most {-need:g}" if need < 0 else f"better by at least {need:g}")
        checks.append({"check": what, "challenger": float(new), "champion": float(old), "gain": gain,
                       "ok": ok, "rule": rule})

    ch, cp = challenger.get("overall") or {}, champion.get("overall") or {}
    check(rules.metric, ch.get(rules.metric), cp.get(rules.metric), rules.margin, strict=True)
    for guard in rules.guards:
        check(guard, ch.get(guard), cp.get(guard), -rules.tolerance, strict=False)
    if rules.per_cohort:
        mine, theirs = challenger.get("by_cohort") or {}, champion.get("by_cohort") or {}
        for cohort in sorted(set(mine) & set(theirs)):
            check(f"{rules.metric}/{cohort}", mine[cohort].get(rules.metric), theirs[cohort].get(rules.metric),
                  -rules.tolerance, strict=False)
    failed = [c for c in checks if not c["ok"]]

    def say(c: dict[str, Any]) -> str:
        if c.get("gain") is None:
            return f"{c['check']}: {c['rule']}"
        return f"{c['check']} {c['challenger']:.4f} vs {c['champion']:.4f} (needs {c['rule']})"

    if failed:
        return False, "refused: " + "; ".join(say(c) for c in failed), checks
    return True, "promoted: " + "; ".join(say(c) for c in checks), checks


def promote_candidate(client, name: str, version: str, score: Callable[[str, str], Figures],
                      rules: PromoteRules, *, run_id: str | None = None) -> Decision:
    """Give ``version`` the challenger alias and make it champion if it beats the champion.

    ``score(role, version)`` evaluates one version on the fixed evaluation set (role is
    'challenger' or 'champion'). The first version of a model becomes champion (it is still
    scored, so its figures are recorded). The decision is written as tags on the version."""
    version = str(version)
    _check_version(client, name, version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    before = _alias(client, name, CHAMPION)
    if before == version:
        d = Decision(name, version, "unchanged", f"version {version} is already the champion",
                     champion_before=before, champion_after=before)
        _tag_decision(client, d, run_id)
        return d
    challenger = score(CHALLENGER, version)
    if before is None:
        d = Decision(name, version, "first", f"first champion of {name}: no champion to compare with",
                     champion_before=None, champion_after=version, challenger=challenger)
        _crown(client, name, version, None)
    else:
        champion = score(CHAMPION, before)
        ok, reason, checks = compare(challenger, champion, rules)
        d = Decision(name, version, "promoted" if ok else "refused", f"{reason} (champion was version {before})",
                     champion_before=before, champion_after=version if ok else before, challenger=challenger,
                     champion=champion, checks=checks)
        if ok:
            _crown(client, name, version, before)
    _tag_decision(client, d, run_id)
    log.warning("%s version %s: %s", name, version, d.reason)
    return d


def promote(client, name: str, version: str, *, reason: str = "promoted by an operator") -> Decision:
    """Operator override: make ``version`` champion without an evaluation (recorded as manual)."""
    version = str(version)
    _check_version(client, name, version)
    before = _alias(client, name, CHAMPION)
    if before == version:
        return Decision(name, version, "unchanged", f"version {version} is already the champion",
                        champion_before=before, champion_after=before)
    _crown(client, name, version, before)
    d = Decision(name, version, "manual", f"{reason} (champion was version {before or 'none'})",
                 champion_before=before, champion_after=version)
    _tag_decision(client, d, None)
    return d


def rollback(client, name: str) -> Decision:
    """Restore the champion before the current one (from the history, else ``previous_champion``)."""
    try:
        history = _history(client, name)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"no registered model {name!r} ({str(err).splitlines()[0][:200]}); check the name "
                          "and the tracking URI") from None
    current = _alias(client, name, CHAMPION)
    if history and history[-1] == current:
        history = history[:-1]
    target = history[-1] if history else _alias(client, name, PREVIOUS)
    if target is None or target == current:
        raise ConfigError(f"{name} has no previous champion to roll back to (champion: version {current or 'none'}); "
                          f"choose one with `sonosynth promote {name} --version V`")
    client.set_registered_model_alias(name, CHAMPION, target)
    earlier = [v for v in history[:-1] if v != target] if history else []
    if earlier:
        client.set_registered_model_alias(name, PREVIOUS, earlier[-1])
    else:
        try:
            client.delete_registered_model_alias(name, PREVIOUS)
        except Exception:  # noqa: BLE001 - no such alias
            pass
    _set_history(client, name, history or [target])
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if current:
        client.set_model_version_tag(name, current, "sonosynth.decision", "rolled_back")
        client.set_model_version_tag(name, current, "sonosynth.reason", f"rolled back to version {target} at {when}")
    client.set_model_version_tag(name, target, "sonosynth.restored_at", when)
    return Decision(name, target, "rolled_back", f"champion rolled back from version {current} to version {target}",
                    champion_before=current, champion_after=target)


# -- scoring with an evaluation stage -----------------------------------------------------------

def combine(per_dataset: list[dict[str, Any]], names: list[str], groups: str = "by_cohort") -> Figures:
    """One model's figures over several datasets: image-weighted means, overall and per cohort."""

    def weighted(items: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
        out = {}
        for name in names:
            pairs = [(f.get(name), w) for f, w in items if f.get(name) is not None]
            total = sum(w for _, w in pairs)
            out[name] = sum(float(v) * w for v, w in pairs) / total if pairs and total else None
        return out

    def weight(f: dict[str, Any]) -> float:
        return float(f.get("n_images") or f.get("n") or f.get("examples") or 1)

    overall = weighted([(f, weight(f)) for f in per_dataset])
    cohorts: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for f in per_dataset:
        for cohort, figures in (f.get(groups) or {}).items():
            cohorts.setdefault(cohort, []).append((figures, weight(figures)))
    return {"overall": overall, "by_cohort": {c: weighted(items) for c, items in sorted(cohorts.items())},
            "n_images": int(sum(weight(f) for f in per_dataset))}


def download_version(uri: str, name: str, version: str) -> str:
    """A local folder with the files of model version ``version`` of ``name``."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    source = MlflowClient(uri).get_model_version_download_uri(name, version)
    return mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri,
                                               dst_path=tempfile.mkdtemp(prefix="sonosynth-model-"))


def stage_scorer(cfg: PromoteConfig, parent_run_id: str | None) -> Callable[[str, str], Figures]:
    """``score(role, version)`` with ``cfg.evaluation``'s stage, one run per dataset."""
    from sonosynth.launch.stages import get_stage

    ev = cfg.evaluation
    stage = get_stage(ev.stage)
    names = [cfg.rules.metric, *cfg.rules.guards]
    uri = cfg.tracking.resolved_uri()

    import mlflow

    # models:/ URIs resolve through the process-wide registry URI (MLflow 3 ignores the
    # registry_uri argument of download_artifacts for them), so point it at this store.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)

    def score(role: str, version: str) -> Figures:
        model = f"models:/{cfg.model}/{version}"
        if ev.pass_as == "folder":
            model = download_version(uri, cfg.model, version)
        per, runs = [], []
        for i, dataset in enumerate(ev.datasets):
            data: dict[str, Any] = {}
            for key, value in ev.set.items():
                set_dotted(data, key, value)
            data.update({"dataset": dataset, "split": ev.split, ev.field: model,
                         "out": f"{cfg.out.rstrip('/')}/{role}-v{version}/{i}"})
            fields = stage.config_class.model_fields
            if "progress" in fields:
                data["progress"] = cfg.progress
            if "tracking" in fields:
                data["tracking"] = {**cfg.tracking.model_dump(exclude={"parent_run_id", "tags", "run_name"}),
                                    "uri": uri, "parent_run_id": parent_run_id,
                                    "experiment": cfg.tracking.experiment or EXPERIMENT,
                                    "run_name": f"{role} v{version} #{i}",
                                    "tags": {**{k: v for k, v in cfg.tracking.tags.items()
                                                if k not in ("sonosynth.pipeline_section", "sonosynth.pipeline_key")},
                                             "sonosynth.promote_role": role, "sonosynth.model_version": version}}
            report = stage.run(build(stage.config_class, data, f"promote: evaluating {role} version {version}"))
            if report.failed:
                raise StageFailed(f"evaluating {cfg.model} version {version} on {dataset} failed: {report.failed}")
            per.append(report.figures)
            runs.append(report.tracking.get("run_id"))
        return {**combine(per, names, cfg.rules.groups), "runs": runs}

    return score


def run(cfg: PromoteConfig, score: Callable[[str, str], Figures] | None = None) -> Report:
    """The promote stage: see the module docstring. A model that was not registered (MLflow
    was unreachable) or a registry that cannot be reached defers the promotion: the report
    says so in ``figures['deferred']`` and the pipeline tries again on its next run."""
    from mlflow import MlflowClient

    out = cfg.out.rstrip("/")
    if not cfg.model:
        return _deferred(cfg, "the model was not registered (MLflow was unreachable when it was trained)")
    tracker = Tracker(cfg.tracking, experiment=EXPERIMENT, offline_dir=offline_dir_for(cfg.out))
    tracker.start(tags={"sonosynth.stage": "promote", "sonosynth.out": cfg.out, "sonosynth.model": cfg.model})
    if tracker.enabled and tracker.offline:
        tracker.close("FAILED")
        return _deferred(cfg, f"MLflow at {cfg.tracking.resolved_uri()} is unreachable")
    client = MlflowClient(cfg.tracking.resolved_uri())
    try:
        version = cfg.version
        if version is None:
            versions = client.search_model_versions(f"name='{cfg.model}'")
            if not versions:
                raise ConfigError(f"{cfg.model} has no registered version; train one first")
            version = str(max(int(v.version) for v in versions))
        scorer = score or stage_scorer(cfg, tracker.run_id)
        d = promote_candidate(client, cfg.model, version, scorer, cfg.rules, run_id=tracker.run_id)
    except BaseException:
        tracker.close("FAILED")
        raise
    text = json.dumps(d.to_dict(), indent=1, default=str)
    open_storage(cfg.out, cfg.storage).put_text("decision.json", text)
    tracker.log_params({**cfg.flat(), "version": version})
    tracker.log_tags({"sonosynth.decision": d.decision, "sonosynth.reason": d.reason[:4900],
                      "sonosynth.model_version": version, "sonosynth.champion": d.champion_after or ""})
    metrics = {}
    for role, figures in (("challenger", d.challenger), ("champion", d.champion)):
        metrics.update({f"{role}/{k}": v for k, v in (figures.get("overall") or {}).items() if v is not None})
        for cohort, values in (figures.get("by_cohort") or {}).items():
            metrics.update({f"{role}/{cohort}/{k}": v for k, v in values.items() if v is not None})
    metrics["promoted"] = float(d.promoted)
    tracker.log_metrics(metrics, 0)
    tracker.log_text(text, "decision.json")
    tracker.close("FINISHED")
    return Report(stage="promote", out=cfg.out, text=render(d), figures=d.to_dict(),
                  outputs={"decision": f"{out}/decision.json"},
                  tracking={"uri": tracker.uri if tracker.enabled else None, "run_id": tracker.run_id,
                            "registered_model": cfg.model, "version": version, "offline": tracker.offline})


def _deferred(cfg: PromoteConfig, why: str) -> Report:
    text = (f"promotion of {cfg.model or 'the model'} deferred: {why}; the next pipeline run tries again "
            f"(or: sonosynth promote NAME --version V)")
    log.warning(text)
    return Report(stage="promote", out=cfg.out, text=text,
                  figures={"decision": "deferred", "deferred": True, "reason": why})


def render(d: Decision) -> str:
    """The decision for people: the verdict, then both versions' figures side by side."""
    lines = [f"{d.model} version {d.version}: {d.decision} -> champion is version {d.champion_after}",
             f"  {d.reason}"]
    for c in d.checks:
        if c.get("gain") is not None:
            lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: challenger {c['challenger']:.4f}, "
                         f"champion {c['champion']:.4f} ({c['rule']})")
    return "\n".join(lines)


__all__ = ["Decision", "PromoteConfig", "PromoteEvaluationConfig", "PromoteRules", "combine", "compare",
           "promote", "promote_candidate", "rollback", "run", "stage_scorer"]
