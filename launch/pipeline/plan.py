"""The plan: every section's key and folder, which sections are not run, validated up front."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from sonosynth.infra.config import Config, ConfigError, build, merge
from sonosynth.infra.jobdir import fingerprint
from sonosynth.infra.storage import StorageError, open_storage

from sonosynth.launch.pipeline.config import PipelineConfig
from sonosynth.launch.pipeline.expressions import BUILTINS, DROP, KEEP, _builtin, _refs, _walk

def _is_local(uri: str) -> bool:
    return "://" not in uri


def _exists(path: str) -> bool:
    if _is_local(path):
        return Path(path).expanduser().exists()
    try:
        return bool(open_storage(path).list(""))
    except Exception:  # noqa: BLE001 - unreachable counts as missing
        return False



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
    from sonosynth.launch.stages import get_stage

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
        identity: dict[str, Any] = resolved.content()
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
