"""Champions for the whole lineage: a promoted model's LoRA follows it, and a rollback undoes both.

When the promote stage makes a SAM (or classifier) version champion, the LoRA version that drew
the synthetic data it was trained on (``lineage.trace``) becomes the LoRA's champion too, so
``generate --lora models:/sonosynth-lora@champion`` samples with the LoRA behind the champion.
The decision is recorded on both versions: the promoted one gets ``sonosynth.lineage.*`` tags
(its sources, synthetic sets, LoRA, base model, and ``sonosynth.lineage.decision``: what happened
to the LoRA's champion); the LoRA version gets ``sonosynth.decision = lineage``,
``sonosynth.promoted_with = <model>/<version>`` and ``sonosynth.synthetic``. Nothing moves for a
version trained on real data only, on sets drawn without a registered LoRA, or on sets drawn by
several LoRAs (one champion cannot stand for them; the decision says which, pick one with
``sonosynth champion set``).

Rolling back the promoted model (``sonosynth champion rollback``) rolls the LoRA back too when
the promotion being undone is the one that made the current LoRA champion
(``sonosynth.promoted_with`` names it); otherwise the LoRA's champion stays, and the command says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sonosynth.infra.config import ConfigError
from sonosynth.infra.model_registry import CHAMPION, AliasChange, Registry
from sonosynth.infra.storage import StorageConfig
from sonosynth.launch.promote.lineage import NONE, SEPARATOR, TAG, Lineage, parse_ref, trace

log = logging.getLogger(__name__)
PROMOTED_WITH = "sonosynth.promoted_with"
"""On a LoRA version: the promotion (``<model>/<version>``) that made it champion."""
LINEAGE_DECISION = "lineage"


@dataclass
class LineageChange:
    """What a promotion did to the champion of the LoRA behind it."""

    lineage: Lineage
    text: str
    lora: AliasChange | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"lineage": self.lineage.to_dict(), "text": self.text,
                "lora": None if self.lora is None else {**self.lora.__dict__}}


def crown_lineage(registry: Registry, promoted: AliasChange, storage: StorageConfig | None = None) -> LineageChange:
    """After ``promoted`` made its version champion: make the LoRA it was trained from the LoRA's champion.
    Never raises: a LoRA that cannot be moved is said in the decision (and logged)."""
    lineage = trace(registry, promoted.model, promoted.version, storage)
    change, text = None, _why_nothing_moves(lineage)
    if text is None:
        lora_model, lora_version = lineage.loras[0]
        try:
            change = _crown_lora(registry, promoted, lineage, lora_model, lora_version)
            text = (f"{lora_model} version {lora_version} was already champion" if change.decision == "unchanged"
                    else f"{lora_model} champion is now version {lora_version} "
                         f"(was {change.champion_before or 'none'})")
        except Exception as err:  # noqa: BLE001 - the promotion stands; the LoRA is left as it was
            text = (f"could not make {lora_model} version {lora_version} champion ({str(err).splitlines()[0][:200]}); "
                    f"do it with `sonosynth champion set {lora_model} --version {lora_version}`")
            log.warning("%s version %s: %s", promoted.model, promoted.version, text)
    try:
        registry.tag_version(promoted.model, promoted.version, {**lineage.tags(), f"{TAG}decision": text[:4900]})
    except Exception as err:  # noqa: BLE001
        log.warning("could not record the lineage on %s version %s: %s", promoted.model, promoted.version, err)
    log.info("%s version %s: %s", promoted.model, promoted.version, text)
    return LineageChange(lineage, text, change)


def _why_nothing_moves(lineage: Lineage) -> str | None:
    keep = "no LoRA champion moved"
    if lineage.error:
        return f"lineage unknown ({lineage.error}); {keep}"
    if not lineage.synthetic:
        return f"trained on real data only: no LoRA; {keep}"
    if not lineage.loras:
        notes = SEPARATOR.join(f"{s.dataset}: {s.note}" for s in lineage.synthetic)
        return f"its synthetic data was drawn without a registered LoRA ({notes}); {keep}"
    if len(lineage.loras) > 1:
        refs = ", ".join(f"{m} version {v}" for m, v in lineage.loras)
        return (f"its synthetic sets were drawn by several LoRAs ({refs}); {keep}: "
                "choose one with `sonosynth champion set`")
    return None


def _crown_lora(registry: Registry, promoted: AliasChange, lineage: Lineage, model: str, version: str) -> AliasChange:
    registry.check_version(model, version)
    before = registry.alias(model, CHAMPION)
    if before == version:
        return AliasChange(model, version, "unchanged", f"version {version} is already the champion", before, before)
    registry.crown(model, version, before)
    sets = [s.dataset for s in lineage.synthetic if (s.lora_model, s.lora_version) == (model, version)]
    reason = (f"champion with {promoted.model} version {promoted.version} ({promoted.decision}), trained on the "
              f"synthetic data it drew ({SEPARATOR.join(sets)}) (champion was version {before or 'none'})")
    registry.tag_version(model, version, {
        "sonosynth.decision": LINEAGE_DECISION, "sonosynth.reason": reason[:4900],
        "sonosynth.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        PROMOTED_WITH: f"{promoted.model}/{promoted.version}", "sonosynth.synthetic": SEPARATOR.join(sets)[:4900]})
    return AliasChange(model, version, LINEAGE_DECISION, reason, before, version)


def rollback_lineage(registry: Registry, rolled: AliasChange) -> str | None:
    """After ``rolled`` gave ``rolled.model``'s champion back: undo the LoRA champion its promotion moved,
    and say what happened to it. None for a model that is itself a lineage's LoRA."""
    undone = rolled.champion_before
    if not undone:
        return None
    tags = registry.client.get_model_version(rolled.model, undone).tags or {}
    if tags.get(PROMOTED_WITH):
        return None
    recorded = tags.get(f"{TAG}lora")
    ref = parse_ref(recorded)
    if ref is None:
        why = ("records no lineage" if recorded is None else
               "was trained without a LoRA" if recorded == NONE else f"names no single LoRA ({recorded})")
        return f"{rolled.model} version {undone} {why}: no LoRA champion changes"
    lora_model, lora_version = ref
    current = registry.alias(lora_model, CHAMPION)
    made_by = None
    if current:
        made_by = (registry.client.get_model_version(lora_model, current).tags or {}).get(PROMOTED_WITH)
    if current != lora_version or made_by != f"{rolled.model}/{undone}":
        return (f"{lora_model}: champion stays version {current or 'none'} (the promotion of {rolled.model} "
                f"version {undone} did not make it champion)")
    try:
        back = registry.rollback(lora_model)
    except ConfigError:
        return f"{lora_model}: champion stays version {current}: it has no earlier champion to go back to"
    registry.tag_version(lora_model, current, {"sonosynth.rolled_back_with": f"{rolled.model}/{undone}"})
    return f"{lora_model}: {back.reason}, with {rolled.model}"


def champion_lineage(registry: Registry, model: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """What ``sonosynth champion show`` prints about the champion's lineage (None: no champion).

    A LoRA made champion with a promotion: the promotion and whether that version is still its
    model's champion. Any other champion: its sources, synthetic sets, LoRA versions (with their
    champion status) and base model, from its ``sonosynth.lineage.*`` tags, else traced now."""
    version = registry.alias(model, CHAMPION)
    if version is None:
        return None
    tags = registry.client.get_model_version(model, version).tags or {}
    if tags.get(PROMOTED_WITH):
        info: dict[str, Any] = {"version": version, "promoted_with": tags[PROMOTED_WITH],
                                "synthetic": tags.get("sonosynth.synthetic", "")}
        with_ref = parse_ref(tags[PROMOTED_WITH])
        if with_ref:
            info["promoted_with_status"] = _status(registry, *with_ref)
        return info
    lineage_tags = {k.removeprefix(TAG): v for k, v in tags.items() if k.startswith(TAG)}
    traced = "tags"
    if "lora" not in lineage_tags and "error" not in lineage_tags:
        lineage_tags = {k.removeprefix(TAG): v for k, v in trace(registry, model, version, storage).tags().items()}
        traced = "lineage.json"
    loras = [] if lineage_tags.get("lora", NONE) == NONE else lineage_tags["lora"].split(SEPARATOR)
    statuses = [{"lora": ref, "status": _status(registry, *found) if (found := parse_ref(ref)) else "not registered"}
                for ref in loras]
    return {"version": version, "from": traced, **lineage_tags, "loras": statuses}


def _status(registry: Registry, model: str, version: str) -> str:
    try:
        champion = registry.alias(model, CHAMPION)
    except Exception as err:  # noqa: BLE001
        return f"unknown ({str(err).splitlines()[0][:100]})"
    return "champion" if champion == version else f"not champion (champion: version {champion or 'none'})"


__all__ = ["LINEAGE_DECISION", "LineageChange", "PROMOTED_WITH", "champion_lineage", "crown_lineage",
           "rollback_lineage"]
