"""The promote stage: score a new model version and the champion on one fixed evaluation set,
decide (``decision.py``), and move the aliases (``sonosynth.infra.model_registry``)."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Literal

from pydantic import model_validator

from sonosynth.infra.config import Config, set_dotted
from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.model_registry import CHALLENGER, CHAMPION, Registry, fetch_model_folder
from sonosynth.infra.secrets import redact_uri
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import StorageConfig, open_storage
from sonosynth.infra.tracking import Tracker, TrackingConfig
from sonosynth.launch.pipeline.child import child_config
from sonosynth.launch.promote.champions import crown_lineage
from sonosynth.launch.promote.decision import Decision, Figures, PromoteRules, combine, compare, render

log = logging.getLogger(__name__)
EXPERIMENT = "sonosynth-promote"


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
    lineage: bool = True
    """When a version becomes champion, also make the LoRA that drew its synthetic training data the
    LoRA's champion (``launch/promote/champions.py``); false: only this model's aliases move."""

    @model_validator(mode="before")
    @classmethod
    def _version_is_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("version"), int):
            data = {**data, "version": str(data["version"])}
        return data


def promote_candidate(registry: Registry, name: str, version: str, score: Callable[[str, str], Figures],
                      rules: PromoteRules, *, run_id: str | None = None, lineage: bool = True,
                      storage: StorageConfig | None = None) -> Decision:
    """Give ``version`` the challenger alias and make it champion if it beats the champion.

    ``score(role, version)`` evaluates one version on the fixed evaluation set (role is
    'challenger' or 'champion'). The first version of a model becomes champion (it is still
    scored, so its figures are recorded). The decision is written as tags on the version. With
    ``lineage``, a new champion's LoRA becomes the LoRA's champion (``champions.crown_lineage``;
    ``storage`` reads its training datasets)."""
    version = str(version)
    registry.check_version(name, version)
    registry.client.set_registered_model_alias(name, CHALLENGER, version)
    before = registry.alias(name, CHAMPION)
    if before == version:
        d = Decision(name, version, "unchanged", f"version {version} is already the champion",
                     champion_before=before, champion_after=before)
        registry.tag_version(name, version, d.tags(run_id))
        return d
    challenger = score(CHALLENGER, version)
    if before is None:
        d = Decision(name, version, "first", f"first champion of {name}: no champion to compare with",
                     champion_before=None, champion_after=version, challenger=challenger)
        registry.crown(name, version, None)
    else:
        champion = score(CHAMPION, before)
        ok, reason, checks = compare(challenger, champion, rules)
        d = Decision(name, version, "promoted" if ok else "refused", f"{reason} (champion was version {before})",
                     champion_before=before, champion_after=version if ok else before, challenger=challenger,
                     champion=champion, checks=checks)
        if ok:
            registry.crown(name, version, before)
    registry.tag_version(name, version, d.tags(run_id))
    log.info("%s version %s: %s", name, version, d.reason)
    if lineage and d.promoted:
        d.lineage = crown_lineage(registry, d, storage).to_dict()
    return d


def stage_scorer(cfg: PromoteConfig, parent_run_id: str | None) -> Callable[[str, str], Figures]:
    """``score(role, version)`` with ``cfg.evaluation``'s stage, one run per dataset."""
    from sonosynth.launch.stages import get_stage

    ev = cfg.evaluation
    stage = get_stage(ev.stage)
    names = [cfg.rules.metric, *cfg.rules.guards]
    uri = cfg.tracking.resolved_uri()

    def score(role: str, version: str) -> Figures:
        model = f"models:/{cfg.model}/{version}"
        if ev.pass_as == "folder":
            model = str(fetch_model_folder(f"models:/{cfg.model}/{version}", uri))
        per, runs = [], []
        for i, dataset in enumerate(ev.datasets):
            data: dict[str, Any] = {}
            for key, value in ev.set.items():
                set_dotted(data, key, value)
            data.update({"dataset": dataset, "split": ev.split, ev.field: model})
            tags = {k: v for k, v in cfg.tracking.tags.items()
                    if k not in ("sonosynth.pipeline_section", "sonosynth.pipeline_key")}
            tracking = {**cfg.tracking.model_dump(exclude={"parent_run_id", "tags", "run_name"}),
                        "uri": uri, "parent_run_id": parent_run_id, "experiment": cfg.tracking.experiment or EXPERIMENT,
                        "run_name": f"{role} v{version} #{i}",
                        "tags": {**tags, "sonosynth.promote_role": role, "sonosynth.model_version": version}}
            child = child_config(stage.config_class, data, out=f"{cfg.out.rstrip('/')}/{role}-v{version}/{i}",
                                 tracking=tracking, progress=cfg.progress,
                                 source=f"promote: evaluating {role} version {version}")
            report = stage.run(child)
            if report.failed:
                raise StageFailed(f"evaluating {cfg.model} version {version} on {dataset} failed: {report.failed}")
            per.append(report.figures)
            runs.append(report.tracking.get("run_id"))
        return {**combine(per, names), "runs": runs}

    return score


def run(cfg: PromoteConfig, score: Callable[[str, str], Figures] | None = None) -> Report:
    """The promote stage: see the module docstring. A model that was not registered (MLflow
    was unreachable) or a registry that cannot be reached defers the promotion: the report
    says so in ``figures['deferred']`` and the pipeline tries again on its next run."""
    out = cfg.out.rstrip("/")
    if not cfg.model:
        return _deferred(cfg, "the model was not registered (MLflow was unreachable when it was trained)")
    tracker = Tracker(cfg.tracking, experiment=EXPERIMENT, offline_dir=offline_dir_for(cfg.out))
    tracker.start(tags={"sonosynth.stage": "promote", "sonosynth.out": cfg.out, "sonosynth.model": cfg.model})
    if tracker.enabled and tracker.offline:
        tracker.close("FAILED")
        return _deferred(cfg, f"MLflow at {redact_uri(cfg.tracking.resolved_uri())} is unreachable")
    registry = Registry(cfg.tracking.resolved_uri())
    try:
        version = cfg.version or registry.latest(cfg.model)
        scorer = score or stage_scorer(cfg, tracker.run_id)
        d = promote_candidate(registry, cfg.model, version, scorer, cfg.rules, run_id=tracker.run_id,
                              lineage=cfg.lineage, storage=cfg.storage)
    except BaseException:
        tracker.close("FAILED")
        raise
    text = json.dumps(d.to_dict(), indent=1, default=str)
    open_storage(cfg.out, cfg.storage).put_text("decision.json", text)
    tracker.log_params({**cfg.flat(), "version": version})
    tracker.log_tags({"sonosynth.decision": d.decision, "sonosynth.reason": d.reason[:4900],
                      "sonosynth.model_version": version, "sonosynth.champion": d.champion_after or "",
                      **({"sonosynth.lineage": d.lineage["text"][:4900]} if d.lineage else {})})
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
            f"(or: sonosynth champion set NAME --version V)")
    log.warning(text)
    return Report(stage="promote", out=cfg.out, text=text,
                  figures={"decision": "deferred", "deferred": True, "reason": why})


__all__ = ["PromoteConfig", "PromoteEvaluationConfig", "promote_candidate", "run", "stage_scorer"]
