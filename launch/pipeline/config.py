"""The pipeline's config, its recipe resolution, and the names it writes under OUT."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

from pydantic import model_validator

from sonosynth.infra.config import Config, apply_overrides, build, merge
from sonosynth.infra.stage import StageFailed
from sonosynth.infra.storage import StorageConfig
from sonosynth.infra.tracking import TrackingConfig

from sonosynth.launch.pipeline.child import parent_root, parent_store
from sonosynth.launch.pipeline.expressions import BUILTINS, _refs

log = logging.getLogger(__name__)
DONE = "_PIPELINE_DONE.json"
STATE = "_pipeline"
LEASE_KEY = f"{STATE}/lease.json"
REPLACED = "_replaced"
SECTION_FIELDS = ("stage", "recipe", "if_exists")
EXPERIMENT = "sonosynth-pipeline"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class PipelineFailed(StageFailed):
    """A stage of the pipeline failed; the message is one line: the stage, the error, the fix."""

    def __init__(self, message: str, section: str, stage: str):
        super().__init__(message)
        self.section, self.stage = section, stage


class PipelineReportConfig(Config):
    """What report.html shows besides the lineage table."""

    grid: str | list[str] | None = None
    """Section(s) whose `grid` output is shown as a synthetic pair grid (null: every generate section)."""
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
        return parent_root(self.out)

    def tracking_uri(self) -> str:
        """The store every stage writes to: tracking.uri, $MLFLOW_TRACKING_URI, else OUT/mlflow.db."""
        return parent_store(self.tracking, self.out)


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
