"""The promotion decision, pure: rules, the comparison, per-dataset figures combined, the text.

Nothing here talks to MLflow (the registry's aliases are ``sonosynth.infra.model_registry``;
the stage that scores both versions and records the decision is ``launch/promote/stage.py``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import model_validator

from sonosynth.infra.config import Config
from sonosynth.infra.model_registry import AliasChange

Figures = dict[str, Any]
"""What a model scored: {"overall": {figure: value}, "by_cohort": {cohort: {figure: value}},
"n_images": n, "runs": [evaluation run ids]}. Every evaluation stage reports its per-group
figures (cohorts, or the classifier's centres) under ``by_cohort``."""


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


@dataclass
class Decision(AliasChange):
    """An alias change with the figures it was decided on."""

    challenger: Figures = field(default_factory=dict)
    champion: Figures = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    """What the promotion did to the LoRA it was trained from (``champions.LineageChange.to_dict``)."""

    @property
    def promoted(self) -> bool:
        return self.champion_after == self.version and self.champion_before != self.version

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "promoted": self.promoted}

    def tags(self, run_id: str | None) -> dict[str, str]:
        """The decision as model-version tags: the verdict, the reason, both versions' figures."""
        tags = {"sonosynth.decision": self.decision, "sonosynth.reason": self.reason[:4900],
                "sonosynth.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.champion_before and self.champion_before != self.version:
            tags["sonosynth.compared_with"] = self.champion_before
        if run_id:
            tags["sonosynth.decision_run"] = run_id
        for role, figures in (("challenger", self.challenger), ("champion", self.champion)):
            for name, value in (figures.get("overall") or {}).items():
                tags[f"sonosynth.{role}_{name}"] = _fmt(value)
            for cohort, values in (figures.get("by_cohort") or {}).items():
                for name, value in values.items():
                    tags[f"sonosynth.{role}_{name}/{cohort}"] = _fmt(value)
        return tags


def _fmt(value: Any) -> str:
    return "none" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


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


def combine(per_dataset: list[dict[str, Any]], names: list[str]) -> Figures:
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
        for cohort, figures in (f.get("by_cohort") or {}).items():
            cohorts.setdefault(cohort, []).append((figures, weight(figures)))
    return {"overall": overall, "by_cohort": {c: weighted(items) for c, items in sorted(cohorts.items())},
            "n_images": int(sum(weight(f) for f in per_dataset))}


def render(d: Decision) -> str:
    """The decision for people: the verdict, then both versions' figures side by side."""
    lines = [f"{d.model} version {d.version}: {d.decision} -> champion is version {d.champion_after}",
             f"  {d.reason}"]
    for c in d.checks:
        if c.get("gain") is not None:
            lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: challenger {c['challenger']:.4f}, "
                         f"champion {c['champion']:.4f} ({c['rule']})")
    if d.lineage.get("text"):
        lines.append(f"  lineage: {d.lineage['text']}")
    return "\n".join(lines)


__all__ = ["Decision", "Figures", "PromoteRules", "combine", "compare", "render"]
