"""report.html's Dice section: each arm's figure per cohort beside the box baseline, its spread over the
test images, and what one run per arm can say about the change between arms."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scipy import stats

from sonosynth.launch.pipeline.report_quality import table_of_text
from sonosynth.launch.pipeline.tables import html_cell, html_table

if TYPE_CHECKING:
    from sonosynth.launch.pipeline.runner import Run

SWEEP = "<code>sonosynth sweep</code> with several seeds (docs/experiments.md)"
SINGLE = "single run, no interval"
BOX_BASELINE = ("The box baseline is the ellipse inscribed in each box prompt, scored exactly like a prediction: "
                "what the prompt alone gives, with no model at all. A fine-tuned SAM should beat it; a model "
                "below it has not yet learnt more than its box prompt tells it: its fine-tuning has not helped yet.")


LOWER_IS_BETTER = ("hd95", "err", "loss")
"""Figures where a smaller value is better (a distance, an error)."""


@dataclass(frozen=True)
class Scored:
    """One evaluation section's figure on one cohort of its test set."""

    section: str
    arm: str | None
    """Its label in report.compare (None: not compared)."""
    cohort: str
    n: int | None
    value: float | None
    baseline: float | None
    std: float | None
    """Sample standard deviation of the per-image figure."""

    @property
    def half_width(self) -> float | None:
        """Half the 95% Student t interval of the mean over the test images: how far the mean could
        move on another test set of this size (test-set sampling only, not seed-to-seed)."""
        if self.std is None or self.n is None or self.n < 2:
            return None
        return float(stats.t.ppf(0.975, self.n - 1)) * self.std / math.sqrt(self.n)

    @property
    def over_baseline(self) -> float | None:
        return None if self.value is None or self.baseline is None else self.value - self.baseline

    def beats_baseline(self, metric: str) -> bool | None:
        over = self.over_baseline
        if over is None:
            return None
        return over < 0 if any(k in metric for k in LOWER_IS_BETTER) else over > 0


def figure_name(metric: str) -> str:
    """A figure as a reader names it: dice_mean is the mean Dice."""
    base = metric.removesuffix("_mean")
    name = {"dice": "Dice", "iou": "IoU"}.get(base, base)
    return f"mean {name}" if metric.endswith("_mean") else name


def _spread_key(metric: str) -> str | None:
    return metric.removesuffix("_mean") + "_std" if metric.endswith("_mean") else None


def scored(r: Run) -> list[Scored]:
    """Every finished section that reports the compared figure (report.metric), per cohort."""
    metric, spread = r.cfg.report.metric, _spread_key(r.cfg.report.metric)
    arms = {s: label for label, sections in r.cfg.report.compare.items() for s in sections}
    found = []
    for step in r.steps:
        figures = (r.reports.get(step.section) or {}).get("figures") or {}
        if metric not in figures:
            continue
        for cohort, f in sorted((figures.get("by_cohort") or {"all": figures}).items()):
            found.append(Scored(step.section, arms.get(step.section), cohort, f.get("n_images"), f.get(metric),
                                f.get(f"box_baseline_{metric}"), f.get(spread) if spread else None))
    return found


def largest_change(found: list[Scored], labels: list[str]) -> tuple[float, float | None] | None:
    """(the largest change of an arm from the first arm on one cohort, the widest 95% half-width over
    test images of the two means it compares), or None with fewer than two arms scored."""
    best: tuple[float, float | None] | None = None
    for cohort in sorted({s.cohort for s in found}):
        by_arm = {s.arm: s for s in found if s.cohort == cohort and s.arm is not None and s.value is not None}
        first = by_arm.get(labels[0]) if labels else None
        for label in labels[1:]:
            other = by_arm.get(label)
            if first is None or other is None:
                continue
            change = other.value - first.value
            halves = [h for h in (first.half_width, other.half_width) if h is not None]
            if best is None or abs(change) > abs(best[0]):
                best = (change, max(halves) if halves else None)
    return best


def _reading(s: Scored, metric: str) -> str:
    beats, over = s.beats_baseline(metric), s.over_baseline
    if beats is None or over is None:
        return ""
    if beats:
        return f"beats the box baseline by {abs(over):.3f}"
    return f"{abs(over):.3f} worse than the box baseline: the fine-tuning has not helped yet"


def _comparison(r: Run, labels: dict[str, list[str]]) -> str:
    metric = r.cfg.report.metric
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
        header.append(f"change ({names[-1]} - {names[0]}; {SINGLE})")
    header.append(f"box baseline {metric}")
    rows = []
    for cohort, by_label in sorted(cells.items()):
        values = [by_label.get(label, (None, None, None))[0] for label in names]
        row = [cohort, next((v[2] for v in by_label.values() if v[2] is not None), None), *values]
        if len(names) > 1:
            row.append(values[-1] - values[0] if values[-1] is not None and values[0] is not None else None)
        row.append(next((v[1] for v in by_label.values() if v[1] is not None), None))
        rows.append(row)
    return html_table("dice-table", header, rows)


def _against_baseline(found: list[Scored], metric: str) -> str:
    rows = []
    for s in found:
        half = s.half_width
        interval = ("one image or no spread reported: no interval" if half is None or s.value is None
                    else f"[{html_cell(s.value - half)}, {html_cell(s.value + half)}]")
        rows.append([html.escape(s.cohort), html.escape(s.arm or ""), html.escape(s.section), html_cell(s.n),
                     html_cell(s.value), html_cell(s.std), interval,
                     html_cell(s.baseline), "" if s.over_baseline is None else f"{s.over_baseline:+.4f}",
                     html.escape(_reading(s, metric))])
    header = ["cohort", "arm", "section", "images", metric, "std over images", "95% interval over images",
              f"box baseline {metric}", "minus box baseline", "reading"]
    return table_of_text("dice-baseline", header, rows)


def dice_section(r: Run) -> str:
    """The arms side by side per cohort, every figure beside its box baseline with its spread over the
    test images, and what a single run per arm can and cannot say."""
    labels = {label: [s for s in sections if s in r.reports] for label, sections in r.cfg.report.compare.items()}
    labels = {k: v for k, v in labels.items() if v}
    if not labels:
        return "<p>No comparison: the recipe's report.compare names no evaluate section that has finished.</p>"
    metric = r.cfg.report.metric
    compared = [s for s in scored(r) if s.arm in labels]
    change = largest_change(compared, list(labels))
    arms = (f"One run per arm: the change column is a {SINGLE}; a change smaller than what another seed gives "
            f"means nothing." if len(labels) > 1 else f"One run: a {SINGLE} over seeds.")
    if change is not None and change[1]:
        within = "within" if abs(change[0]) <= change[1] else "beyond"
        arms += (f" The largest change here, {change[0]:+.3f}, is {within} the ±{change[1]:.3f} that the test "
                 f"images alone allow.")
    return "\n".join([
        _comparison(r, labels),
        f'<p id="box-baseline">{html.escape(BOX_BASELINE)}</p>',
        _against_baseline(compared, metric),
        f'<p id="dice-intervals">{html.escape(arms)} The 95% intervals are over the test images of this one run '
        f"(how far a mean could move on another test set of that size), not over seeds. {SWEEP} gives every "
        f"arm and every change a 95% interval over seeds.</p>"])
