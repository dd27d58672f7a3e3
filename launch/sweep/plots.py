"""Paper A's figure with its uncertainty: a metric against a numeric axis (e.g. N_real), one line per
combination of the other axes, each with its t interval over seeds as a shaded band, and an
optional reference (e.g. the box prompt alone) as a dashed line.

Plain matplotlib Figures rendered by Agg: no pyplot, no global backend switch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from sonosynth.infra.config import ConfigError
from sonosynth.launch.sweep.stats import VERSUS, Difference, Interval

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SIZE_PX = (800, 540)
DPI = 120
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _axes_of(row: dict[str, Any]) -> list[str]:
    """A table row's axes: its text-valued entries but the baseline's name (seeds are a tuple, metrics
    intervals)."""
    return [k for k, v in row.items() if isinstance(v, str) and k != VERSUS]


def _interval(value: Any) -> Interval | None:
    return value.interval if isinstance(value, Difference) else value if isinstance(value, Interval) else None


def _number(x_axis: str, labels: Sequence[str]) -> list[float]:
    try:
        return [float(label) for label in labels]
    except ValueError:
        raise ConfigError(f"x axis {x_axis!r} has labels that are not numbers ({list(dict.fromkeys(labels))}); "
                          f"plot against an axis with numeric labels such as n_real, or give {x_axis!r} "
                          f"numeric labels") from None


def _nan(value: float | None) -> float:
    return np.nan if value is None else value


def metric_figure(cells: Sequence[dict[str, Any]], x_axis: str, metric: str, *,
                  reference: dict[str, Any] | None = None, title: str | None = None) -> "Figure":
    """The figure ``plot_metric_vs_axis`` saves, unsaved (``cells``: rows of ``stats.cell_table`` or
    ``stats.paired_differences``; the band is the rows' own interval level)."""
    from matplotlib.figure import Figure

    if cells and x_axis not in _axes_of(cells[0]):
        raise ConfigError(f"x axis {x_axis!r} is not an axis of the cells; their axes are {_axes_of(cells[0])}")
    if cells and metric not in cells[0]:
        metrics = [k for k, v in cells[0].items() if _interval(v) is not None]
        raise ConfigError(f"metric {metric!r} is not in the cells; they have {metrics}")
    xs = _number(x_axis, [row[x_axis] for row in cells])
    others = [a for a in (_axes_of(cells[0]) if cells else []) if a != x_axis]
    lines: dict[tuple[str, ...], list[tuple[float, Interval]]] = {}
    for x, row in zip(xs, cells):
        iv = _interval(row[metric])
        if iv is not None and iv.mean is not None:
            lines.setdefault(tuple(row[a] for a in others), []).append((x, iv))
    levels = {iv.level for points in lines.values() for _, iv in points}

    fig = Figure(figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI)
    ax = fig.subplots()
    for (labels, points), marker in zip(lines.items(), MARKERS * len(lines)):
        points.sort(key=lambda p: p[0])
        x = np.array([p[0] for p in points])
        name = ", ".join(labels) if len(others) == 1 else ", ".join(f"{a}={v}" for a, v in zip(others, labels))
        (line,) = ax.plot(x, [iv.mean for _, iv in points], marker=marker, label=name or metric)
        ax.fill_between(x, [_nan(iv.lo) for _, iv in points], [_nan(iv.hi) for _, iv in points],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    if reference is not None:
        ax.axhline(reference["value"], color="0.3", linestyle="--", label=reference.get("label", "reference"))
        if reference.get("lo") is not None and reference.get("hi") is not None:
            ax.axhspan(reference["lo"], reference["hi"], color="0.3", alpha=0.12, linewidth=0)
    if not lines:
        ax.text(0.5, 0.5, f"no run reported {metric}", ha="center", va="center", transform=ax.transAxes)
    shown = sorted({x for points in lines.values() for x, _ in points})
    if shown and shown[0] > 0 and shown[-1] / shown[0] > 10:
        ax.set_xscale("log")
        ax.minorticks_off()
    if shown:
        ax.set_xticks(shown, [f"{x:g}" for x in shown])
    ax.set_xlabel(x_axis)
    ax.set_ylabel(f"{metric} minus {cells[0][VERSUS]}" if cells and VERSUS in cells[0] else metric)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"{metric} vs {x_axis}", fontsize=11)
    if lines or reference is not None:
        heading = others[:1] if len(others) == 1 else []
        heading += [f"bands: {levels.pop():.0%} t interval over seeds"] if len(levels) == 1 else []
        ax.legend(title="; ".join(heading) or None, fontsize=8, title_fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_metric_vs_axis(cells: Sequence[dict[str, Any]], x_axis: str, metric: str, path: str | Path, *,
                        reference: dict[str, Any] | None = None, title: str | None = None) -> Path:
    """Draw ``metric`` against the numeric labels of ``x_axis`` (log scale when they span more than a
    decade): one line with markers per combination of the other axes, its interval as a band, and
    ``reference`` ({"label", "value", optional "lo", "hi"}) as a dashed line with its band. Writes a
    PNG of 800 x 540 px and returns its path."""
    fig = metric_figure(cells, x_axis, metric, reference=reference, title=title)
    fig.savefig(path, dpi=DPI)
    return Path(path)
