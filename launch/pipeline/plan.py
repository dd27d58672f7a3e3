"""The plan: every section's key and folder, which sections are not run, validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from sonosynth.infra.config import Config, ConfigError, build, merge
from sonosynth.infra.jobdir import fingerprint
from sonosynth.infra.storage import StorageError, open_storage

from sonosynth.launch.pipeline.config import PipelineConfig
from sonosynth.launch.pipeline.expressions import BUILTINS, DROP, KEEP, _builtin, _refs, _walk
from sonosynth.launch.pipeline.gate import Gate, check_order, gate_step, has_limits, scored_section

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
    found: bool | None = None
    """Whether its if_exists path was there when first planned (None: no if_exists)."""
    scores: str | None = None
    """The section whose output this one scores (a quality section's ``synthetic.dataset``)."""
    gate_limits: bool = False
    """Its config sets a gate limit: the sections that read ``scores`` must come after it."""
    gated_by: str | None = None
    """The quality section whose failed gate stops this one."""
    without: list[str] = field(default_factory=list)
    """Its ``data.sources`` entries left out by a failed ``train_without`` gate (``without_by``)."""
    without_by: str | None = None

    @property
    def uses(self) -> list[str]:
        return sorted({r.split(".", 1)[0] for r in _refs(self.data)} - set(BUILTINS))


def _stage(name: str):
    from sonosynth.launch.stages import get_stage

    return get_stage(name)


def plan(cfg: PipelineConfig, gates: dict[str, Gate] | None = None,
         previous: list[Step] | None = None) -> list[Step]:
    """Every section's key and folder, and which sections are not run; validates every stage's
    config before anything runs (a ConfigError names the section and the key). ``gates``: the failed
    gates read so far (``gate.py``); ``previous``: the plan they re-plan, whose look-ups outside the
    pipeline (if_exists, source fingerprints) are kept so that only the gates change the plan."""
    from sonosynth.launch.recipes import find_recipe, load_recipe

    root = cfg.root()
    gates = {name: gate for name, gate in (gates or {}).items() if gate.acts}
    before = {s.section: s for s in previous or []}
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
        step = Step(section, stage_name, index, data, scores=scored_section(data, steps))
        steps[section] = step
        if if_exists is not None:
            where = _walk(if_exists, lambda ref, _p: _builtin(ref, root))
            known = before.get(section)
            step.found = known.found if known is not None and known.found is not None else _exists(str(where))
            if not step.found:
                step.skip = f"if_exists: {where} is missing"
                continue
        stopper = gate_step(step, steps, gates) if gates else None
        if stopper is not None:
            step.gated_by, step.skip = stopper.section, f"gated by {stopper.section}: {stopper.decision}"
            continue

        def for_key(ref: str, _path: str) -> Any:
            head = ref.split(".", 1)[0]
            if head not in steps:
                return KEEP
            up = steps[head]
            return DROP if up.skip else f"${{{ref}}}@{up.key}"

        probe = _walk(step.data, for_key)
        if probe is DROP:
            step.skip = "it reads " + ", ".join(s for s in step.uses if steps[s].skip) + ", which is not run"
            continue
        fields = stage.config_class.model_fields
        if "out" in fields:
            probe["out"] = f"{root}/{section}/_"
        try:
            resolved = build(stage.config_class, probe, f"pipeline section {section} (stage {stage_name})")
        except ConfigError:
            if not step.without:
                raise
            gate = gates[step.without_by]  # its config does not hold without the synthetic sources
            step.gated_by, step.skip = gate.section, f"gated by {gate.section}: {gate.decision}"
            step.without, step.without_by = [], None
            continue
        step.gate_limits = step.scores is not None and has_limits(getattr(resolved, "gate", None))
        identity: dict[str, Any] = resolved.content()
        known = before.get(section)
        step.source = known.source if known is not None and known.source is not None \
            else _source_fingerprint(section, resolved)
        if step.source is not None:
            identity["source"] = step.source["digest"]
        step.key = fingerprint({"stage": stage_name, "config": identity})[:12]
        step.out = f"{root}/{section}/{step.key}"
    check_order(list(steps.values()))
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
