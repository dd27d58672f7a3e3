"""report.html's first screen: what ran at what scale (models, training steps, images) and what its
figures can and cannot support, derived from the sections' figures and resolved configs; nothing here
knows the demo's numbers."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from sonosynth.infra.secrets import redact_uri
from sonosynth.launch.pipeline.report_dice import SWEEP, Scored, figure_name, largest_change, scored

if TYPE_CHECKING:
    from sonosynth.launch.pipeline.plan import Step
    from sonosynth.launch.pipeline.runner import Run

SMOKE_STEPS = 300
"""A model trained from random weights for fewer steps is smoke-test sized (a real fine-tune of a
pretrained model may be short: paper A's SAM arm is 80 steps; a model from scratch needs thousands)."""
SMALL_EVALUATION = 50
"""Fewer test images per cohort: a mean Dice moves by hundredths from one such test set to another."""
PARAMETERS = ("parameters", "trainable_parameters")
"""Figures a training stage may report its model size under."""


@dataclass(frozen=True)
class Trained:
    """A training section: its steps, examples and model (as its config describes it)."""

    section: str
    stage: str
    steps: int
    examples: int | None
    model: str
    random_init: bool | None
    """Trained from random weights (its config names no pretrained checkpoint); None: unknown."""
    parameters: dict[str, int]

    @property
    def smoke(self) -> bool:
        return self.steps < SMOKE_STEPS and self.random_init is not False


@dataclass(frozen=True)
class Images:
    """A dataset section: real images with their splits, or synthetic pairs."""

    section: str
    synthetic: bool
    count: int
    detail: str


@dataclass
class Scale:
    trained: list[Trained]
    images: list[Images]
    evaluated: list[Scored]
    arms: list[str]
    """report.compare's labels that have a finished section."""
    metric: str


def describe_model(config: dict[str, Any], stage: str) -> tuple[str, bool | None]:
    """(what a training config says of its model, whether it starts from random weights)."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    name = model.get("arch") or model.get("backbone")
    weights = next((k for k in ("checkpoint", "pretrained") if k in model), None)
    random_init = None if weights is None else not model.get(weights)
    if name and name != "tiny":
        head = str(name)
    elif name == "tiny" or (random_init and isinstance(model.get("tiny"), dict)):
        head = "tiny model"
    else:
        head = "model"
    parts = [head]
    if random_init:
        parts[0] += " from random weights"
    elif random_init is False:
        parts[0] += f" from {os.path.basename(redact_uri(str(model[weights])).rstrip('/')) or model[weights]}"
    if isinstance(config.get("mode"), str):
        parts.append(f"mode {config['mode']}")
    lora = config.get("lora")
    if isinstance(lora, dict) and lora.get("rank") and (stage == "train-lora" or config.get("mode") == "lora"):
        parts.append(f"LoRA rank {lora['rank']}")
    return ", ".join(parts), random_init


def _config(r: Run, step: Step) -> dict[str, Any]:
    """The section's resolved config (OUT/SECTION/KEY/config.yaml, written by the stage); {} when absent."""
    try:
        data = yaml.safe_load(r.storage.get_text(f"{step.section}/{step.key}/config.yaml"))
    except Exception:  # noqa: BLE001 - a stage that writes no config.yaml is described by its figures only
        return {}
    return data if isinstance(data, dict) else {}


def read_scale(r: Run) -> Scale:
    trained, images = [], []
    for step in r.steps:
        figures = (r.reports.get(step.section) or {}).get("figures") or {}
        if isinstance(figures.get("steps"), int) and "examples" in figures:
            model, random_init = describe_model(_config(r, step), step.stage)
            trained.append(Trained(step.section, step.stage, figures["steps"], figures.get("examples"), model,
                                   random_init, {k: int(figures[k]) for k in PARAMETERS
                                                 if isinstance(figures.get(k), (int, float))}))
        elif isinstance(figures.get("splits"), dict):
            splits = ", ".join(f"{k} {v}" for k, v in figures["splits"].items())
            total = figures.get("ingested", sum(v for v in figures["splits"].values() if isinstance(v, int)))
            images.append(Images(step.section, False, int(total), splits))
        elif isinstance(figures.get("accepted"), int):
            mode = f"{figures['mode']} mode, " if figures.get("mode") else ""
            images.append(Images(step.section, True, figures["accepted"],
                                 f"{mode}{figures.get('requested', figures['accepted'])} requested"))
    arms = [label for label, sections in r.cfg.report.compare.items() if any(s in r.reports for s in sections)]
    return Scale(trained, images, scored(r), arms, r.cfg.report.metric)


def _span(values: list[int] | list[float], fmt: str = "{}") -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)} to {fmt.format(high)}"


def _names(items: list[Trained]) -> str:
    return ", ".join(t.section for t in items)


def scale_list(s: Scale) -> str:
    """What ran: each training section's steps, examples and model; the images; the test sets."""
    items = []
    if s.trained:
        parts = []
        for t in s.trained:
            size = "; ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in t.parameters.items())
            parts.append(f"{t.section} ({t.stage}): {t.steps} steps"
                         f"{f' on {t.examples} examples' if t.examples is not None else ''}"
                         f"{', ' + t.model if t.model else ''}{', ' + size if size else ''}")
        items.append("<b>Training</b>: " + html.escape("; ".join(parts)))
    if s.images:
        parts = [f"{i.section} {i.count} {'synthetic pairs' if i.synthetic else 'images'} ({i.detail})"
                 for i in s.images]
        items.append("<b>Images</b>: " + html.escape("; ".join(parts)))
    if s.evaluated:
        cohorts: dict[str, set[int]] = {}
        for e in s.evaluated:
            if e.n is not None:
                cohorts.setdefault(e.cohort, set()).add(e.n)
        parts = [f"{c} {_span(sorted(n))} test images" for c, n in cohorts.items()]
        items.append(f"<b>Evaluation</b>: {html.escape('; '.join(parts))} "
                     f"({html.escape(', '.join(dict.fromkeys(e.section for e in s.evaluated)))})")
    if not items:
        return '<ul id="scale"><li>No section reported training steps, images or test figures.</li></ul>'
    return '<ul id="scale">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def figures_mean(s: Scale) -> str:
    """A plain-language paragraph: what this run's figures can support at its scale."""
    said = []
    smoke = [t for t in s.trained if t.smoke]
    if smoke:
        random_init = " from random weights" if all(t.random_init for t in smoke) else ""
        said.append(
            f"<b>Smoke-test scale.</b> {html.escape(_names(smoke))} trained for {_span([t.steps for t in smoke])} "
            f"steps{random_init} (fewer than {SMOKE_STEPS}): these models are smoke-test sized. This run shows "
            f"that every stage works and hands its outputs to the next; its figures do not measure how good the "
            f"models or the synthetic data can be. At this scale a {html.escape(figure_name(s.metric))} below the "
            f"box baseline is expected.")
    elif s.trained:
        said.append(f"Training ran {_span([t.steps for t in s.trained])} steps per model "
                    f"({html.escape(_names(s.trained))}).")
    small = [e for e in s.evaluated if e.n is not None and e.n < SMALL_EVALUATION]
    if small:
        halves = [e.half_width for e in small if e.half_width]  # 0: every image scored the same
        figure = html.escape(figure_name(s.metric))
        spread = (f"a {figure} over so few images is uncertain by ±{_span(sorted(halves), '{:.3f}')} (95%, from its "
                  f"spread over the images), so smaller differences" if halves else
                  f"a {figure} over so few images moves from one test set to the next, so small differences")
        said.append(f"The test sets are small ({_span(sorted({e.n for e in small}))} images per cohort, fewer than "
                    f"{SMALL_EVALUATION}): {spread} say nothing about which model is better.")
    below = [e for e in s.evaluated if e.beats_baseline(s.metric) is False]
    if below and not smoke:
        said.append(f"{html.escape(', '.join(dict.fromkeys(e.section for e in below)))} did not beat the box "
                    f"baseline: their fine-tuning has not helped yet.")
    if len(s.arms) > 1:
        change = largest_change([e for e in s.evaluated if e.arm in s.arms], s.arms)
        text = ("Each arm was trained once (one seed), so the change between arms has no interval: a change "
                "smaller than the run-to-run noise (what another seed gives) means nothing.")
        if change is not None and change[1]:
            text += (f" The largest change here is {change[0]:+.3f}, " + (
                f"within the ±{change[1]:.3f} the test images alone allow." if abs(change[0]) <= change[1] else
                f"beyond the ±{change[1]:.3f} the test images alone allow; whether it is beyond what another "
                f"seed gives, one run cannot tell."))
        said.append(f"{text} {SWEEP} gives every arm and every change a 95% interval.")
    elif s.evaluated:
        said.append(f"This is a single run: no interval over seeds; {SWEEP} gives 95% intervals.")
    if not said:
        return '<p id="what-figures-mean">This run trained and scored nothing: it has no figures to read.</p>'
    return f'<p id="what-figures-mean">{" ".join(said)}</p>'


def scale_block(r: Run) -> str:
    s = read_scale(r)
    return scale_list(s) + "\n" + figures_mean(s)
