"""A replicated sweep's statistics: each cell's mean with a Student t interval over its seeds, and the
paired difference of every arm from a baseline arm, seed by seed.

The input is one dict per run: the cell's axis labels (text), ``seed`` (absent when the sweep has
no replicates) and metrics (floats, None where a run lacks one), e.g.
``{"n_real": "4", "arm": "real", "seed": 0, "eval:dice_mean": 0.71}``. Within one seed every arm
trains on the same real subset, so the difference of two arms at one seed cancels what that subset
contributes; its interval (a paired t) is narrower than the cells' own intervals suggest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

from sonosynth.infra.config import ConfigError
from sonosynth.launch.pipeline.tables import to_csv, to_markdown
from sonosynth.launch.sweep.config import SEED  # a run without it is its cell's only replicate
SEEDS = "seeds"
"""The column of a table row that lists the seeds of its runs (a tuple, so it never reads as an axis)."""
VERSUS = "vs"
"""The column of a differences row naming its baseline, e.g. ``arm=real``."""
NO_INTERVAL = "—"


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values and its Student t interval at ``level``; lo, hi and sd are None when
    n < 2, mean too when n == 0."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    sd: float | None
    level: float = 0.95


@dataclass(frozen=True)
class Difference:
    """A cell minus its baseline cell, paired by seed: the interval of the per-seed differences, the
    seeds both had a value at, and the fraction of those where the cell is higher (None: no seed)."""

    interval: Interval
    seeds: tuple[Any, ...]
    positive_fraction: float | None


def t_interval(values: Iterable[float | None], level: float = 0.95) -> Interval:
    """Mean and two-sided Student t interval (n - 1 degrees of freedom) of the values; None and NaN
    are dropped."""
    if not 0 < level < 1:
        raise ConfigError(f"level {level} is not a probability; give e.g. 0.95 for a 95% interval")
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return Interval(None, None, None, 0, None, level)
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, None, None, 1, None, level)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1)) * sd / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x), sd, level)


def _by_cell(runs: Sequence[dict[str, Any]], axes: Sequence[str]) -> dict[tuple[str, ...], dict[Any, dict]]:
    """{labels: {seed: run}} in first-seen order; refuses unknown axes and two runs of one cell and seed."""
    if not runs:
        return {}
    for axis in axes:
        missing = [i for i, run in enumerate(runs) if axis not in run]
        if len(missing) == len(runs):
            known = [k for k in runs[0] if isinstance(runs[0][k], str) and all(k in r for r in runs)]
            raise ConfigError(f"axis {axis!r} is not a label of the runs; their axes are {known}")
        if missing:
            raise ConfigError(f"run #{missing[0]} ({runs[missing[0]]}) has no label on axis {axis!r}; "
                              f"give every run a label on every axis")
    cells: dict[tuple[str, ...], dict[Any, dict]] = {}
    for run in runs:
        labels = tuple(str(run[a]) for a in axes)
        seed = run.get(SEED)
        replicates = cells.setdefault(labels, {})
        if seed in replicates:
            raise ValueError(f"two runs of cell {dict(zip(axes, labels))} at seed {seed}; keep one run per "
                             f"cell and seed (e.g. the latest)")
        replicates[seed] = run
    return cells


def _sorted_seeds(seeds: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(sorted(seeds, key=lambda s: (s is None, s if isinstance(s, (int, float)) else str(s))))


def _value(run: dict[str, Any], metric: str) -> float | None:
    value = run.get(metric)
    return None if value is None or math.isnan(float(value)) else float(value)


def cell_table(runs: Sequence[dict[str, Any]], axes: Sequence[str], metrics: Sequence[str],
               level: float = 0.95) -> list[dict[str, Any]]:
    """One row per cell, in the runs' first-seen order: ``{axis: label, ..., "seeds": (0, 1, 2),
    metric: Interval, ...}``; each metric's interval is over the seeds whose run has a value."""
    rows = []
    for labels, replicates in _by_cell(runs, axes).items():
        row: dict[str, Any] = {**dict(zip(axes, labels)), SEEDS: _sorted_seeds(replicates)}
        for metric in metrics:
            row[metric] = t_interval([_value(run, metric) for run in replicates.values()], level)
        rows.append(row)
    return rows


def paired_differences(runs: Sequence[dict[str, Any]], axes: Sequence[str], metrics: Sequence[str],
                       baseline: tuple[str, str], level: float = 0.95) -> list[dict[str, Any]]:
    """Every cell whose label on the baseline's axis differs from the baseline label, minus the cell
    with the same other labels and the baseline label, seed by seed (a paired t over the seeds both
    have a value at). Rows: ``{axis: label, ..., "vs": "arm=real", "seeds": (seeds both cells ran),
    metric: Difference, ...}``; a cell without a baseline cell (excluded from the grid) has no row."""
    axis, label = baseline
    if axis not in axes:
        raise ConfigError(f"baseline axis {axis!r} is not one of the axes {list(axes)}; give (axis, label), "
                          f"e.g. ('arm', 'real')")
    cells = _by_cell(runs, axes)
    at = list(axes).index(axis)
    labels_on_axis = list(dict.fromkeys(labels[at] for labels in cells))
    if cells and label not in labels_on_axis:
        raise ConfigError(f"baseline label {label!r} is not on axis {axis!r}; its labels are {labels_on_axis}")
    rows = []
    for labels, replicates in cells.items():
        base = cells.get(labels[:at] + (label,) + labels[at + 1:])
        if labels[at] == label or base is None:
            continue
        row: dict[str, Any] = {**dict(zip(axes, labels)), VERSUS: f"{axis}={label}",
                               SEEDS: _sorted_seeds(set(replicates) & set(base))}
        for metric in metrics:
            row[metric] = _difference(replicates, base, metric, level)
        rows.append(row)
    return rows


def _difference(cell: dict[Any, dict], base: dict[Any, dict], metric: str, level: float) -> Difference:
    pairs = {seed: (_value(cell[seed], metric), _value(base[seed], metric)) for seed in set(cell) & set(base)}
    seeds = _sorted_seeds(s for s, (a, b) in pairs.items() if a is not None and b is not None)
    diffs = np.asarray([pairs[s][0] - pairs[s][1] for s in seeds], dtype=float)
    return Difference(t_interval(diffs, level), seeds, float((diffs > 0).mean()) if len(diffs) else None)


def _interval_text(iv: Interval, signed: bool) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if iv.mean is None:
        return NO_INTERVAL
    if iv.lo is None:
        return f"{fmt.format(iv.mean)} {NO_INTERVAL}"
    return f"{fmt.format(iv.mean)} [{fmt.format(iv.lo)}, {fmt.format(iv.hi)}]"


def _markdown_cell(value: Any, seeds: int) -> Any:
    if isinstance(value, Interval):
        text = _interval_text(value, signed=False)
        return f"{text} (n={value.n})" if value.mean is not None and value.n < seeds else text
    if isinstance(value, Difference):
        text = _interval_text(value.interval, signed=True)
        n = value.interval.n
        return text if not n else f"{text} ({round(value.positive_fraction * n)}/{n} > 0)"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return value


def _csv_cells(key: str, value: Any) -> dict[str, Any]:
    iv = value.interval if isinstance(value, Difference) else value
    if isinstance(iv, Interval):
        out = {key: iv.mean, f"{key}:lo": iv.lo, f"{key}:hi": iv.hi, f"{key}:sd": iv.sd, f"{key}:n": iv.n}
        if isinstance(value, Difference):
            out[f"{key}:positive"] = value.positive_fraction
        return out
    return {key: " ".join(str(v) for v in value) if isinstance(value, tuple) else value}


def intervals_markdown(rows: list[dict[str, Any]]) -> str:
    """A ``cell_table`` or ``paired_differences`` table as Markdown: ``0.712 [0.690, 0.734]`` (mean and
    interval, 3 decimals), ``0.712 —`` for one seed, ``(n=2)`` where fewer seeds than the row's ran have a
    value; differences signed, with how many seeds were > 0."""
    return to_markdown([{k: _markdown_cell(v, len(row.get(SEEDS, ()))) for k, v in row.items()} for row in rows])


def intervals_csv(rows: list[dict[str, Any]]) -> str:
    """The same table as CSV with numbers: per metric the mean, then ``metric:lo``, ``:hi``, ``:sd``,
    ``:n`` (and ``:positive``, the fraction of seeds > 0, for differences); seeds space-separated."""
    return to_csv([{k: c for key, value in row.items() for k, c in _csv_cells(key, value).items()}
                   for row in rows])
