"""Quality gates: what a failed gate of a quality section does to the sections after it.

A quality section (``stage: quality``) scores the output of the section its ``synthetic.dataset``
names (the *scored* section, e.g. ``${synthetic.out}``) and reports ``figures.gate``: ``passed``,
its ``checks``, ``on_fail`` and a one-sentence ``decision``. The stage exits 0 either way; the
pipeline acts on a failed gate in the sections below the quality section that read the scored
section, directly or through other sections (the synthetic arm):

- ``skip_synthetic`` (default): none of them runs; each is recorded as gated, with the decision;
- ``train_without``: the entries of a section's ``data.sources`` that read the synthetic arm are
  left out (the section gets a new key: it trains a different model); a section that reads the arm
  any other way, or has no source left, is gated.

A section that reads a gated one is gated too. A gate that passed changes nothing. The decisions
come from the quality section's report, which a resumed run reads back from its
``_PIPELINE_DONE.json``: the same config gives the same decisions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sonosynth.infra.config import ConfigError

from sonosynth.launch.pipeline.expressions import _refs

if TYPE_CHECKING:
    from sonosynth.launch.pipeline.plan import Step

log = logging.getLogger(__name__)
ON_FAIL = ("skip_synthetic", "train_without")


@dataclass(frozen=True)
class Gate:
    """The gate a quality section reported."""

    section: str
    """The quality section."""
    scored: str | None
    """The section whose output it scored (None: a dataset from outside the pipeline)."""
    passed: bool
    on_fail: str
    """skip_synthetic or train_without."""
    decision: str
    """The stage's one-sentence decision."""

    @property
    def acts(self) -> bool:
        """A failed gate on a section of this pipeline: the sections reading it are gated."""
        return not self.passed and self.scored is not None

    def headline(self) -> str:
        if self.passed:
            return f"gate passed: {self.decision}"
        if self.scored is None:
            return f"gate failed: {self.decision} (it scored no section of this pipeline: nothing to gate)"
        return f"gate failed ({self.on_fail}): {self.decision}"


def _heads(node: Any) -> list[str]:
    return [ref.split(".", 1)[0] for ref in _refs(node)]


def scored_section(data: dict[str, Any], sections: dict[str, Any]) -> str | None:
    """The earlier section a section's ``synthetic.dataset`` reads, if any."""
    synthetic = data.get("synthetic")
    dataset = synthetic.get("dataset") if isinstance(synthetic, dict) else None
    return next((head for head in _heads(dataset) if head in sections), None)


def has_limits(gate: Any) -> bool:
    """A gate config (or mapping) with at least one limit set: it can fail."""
    values = gate.model_dump() if hasattr(gate, "model_dump") else gate if isinstance(gate, dict) else {}
    return any(v is not None for k, v in values.items() if k != "on_fail")


def read_gate(step: Step, report: dict[str, Any]) -> Gate | None:
    """The gate in a section's report figures (None when it reports none)."""
    gate = (report.get("figures") or {}).get("gate")
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        return None
    on_fail = gate.get("on_fail") or ON_FAIL[0]
    if on_fail not in ON_FAIL:  # the stage validates it; a stored report from elsewhere takes the safe side
        log.warning("stages.%s: gate.on_fail=%r is none of %s; acting as skip_synthetic", step.section, on_fail,
                    ", ".join(ON_FAIL))
        on_fail = ON_FAIL[0]
    decision = " ".join(str(gate.get("decision") or ("passed" if gate["passed"] else "failed")).split())
    return Gate(step.section, step.scores, gate["passed"], on_fail, decision)


def gate_step(step: Step, steps: dict[str, Step], gates: dict[str, Gate]) -> Gate | None:
    """The failed gate that stops ``step`` (None: it runs). Under ``train_without`` the entries of its
    ``data.sources`` that read the synthetic arm are dropped from ``step.data`` (``step.without``)."""
    arm: dict[str, Gate] = {}
    for gate in gates.values():
        if gate.acts and gate.section in steps and steps[gate.section].index < step.index:
            if gate.scored not in arm or gate.on_fail == "skip_synthetic":
                arm[gate.scored] = gate
    if not arm:
        return None

    def stopped_by(node: Any) -> Gate | None:
        for head in _heads(node):
            if head in arm:
                return arm[head]
            up = steps.get(head)
            if up is not None and up.gated_by:
                return gates[up.gated_by]
        return None

    mix = step.data.get("data")
    sources = mix.get("sources") if isinstance(mix, dict) else None
    if isinstance(sources, dict):
        kept, dropped, by = {}, [], None
        for name, entry in sources.items():
            gate = stopped_by(entry)
            if gate is not None and gate.on_fail == "train_without":
                dropped.append(name)
                by = by or gate
            else:
                kept[name] = entry
        if dropped:
            if not any(not (isinstance(e, dict) and e.get("count") == 0) for e in kept.values()):
                return by  # nothing left to train on
            step.data = {**step.data, "data": {**mix, "sources": kept}}
            step.without, step.without_by = dropped, by.section
    return stopped_by(step.data)


def check_order(steps: list[Step]) -> None:
    """A quality section with a gate limit must come before every section that reads what it scores."""
    reads: dict[str, set[str]] = {}
    for step in steps:
        direct = set(step.uses)
        reads[step.section] = direct.union(*(reads.get(u, set()) for u in direct))
    index = {s.section: s.index for s in steps}
    for gate in steps:
        if not gate.gate_limits or gate.scores is None:
            continue
        early = [s.section for s in steps
                 if index[gate.scores] < s.index < gate.index and gate.scores in reads[s.section]]
        if early:
            raise ConfigError(
                f"stages.{gate.section} gates the sections that read {gate.scores}, but {', '.join(early)} "
                f"read{'s' if len(early) == 1 else ''} {gate.scores} and come{'s' if len(early) == 1 else ''} "
                f"before {gate.section}; a gate acts only on the sections after it: move {gate.section} right "
                f"below {gate.scores} (or {', '.join(early)} below {gate.section})")
