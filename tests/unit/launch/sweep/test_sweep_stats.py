"""The sweep's statistics: t intervals over seeds, the cell table and the paired differences, and their tables."""

from __future__ import annotations

import csv
import io
import math

import pytest
from scipy import stats as scipy_stats

from sonosynth.infra.config import ConfigError
from sonosynth.launch.sweep.stats import (
    Interval, cell_table, intervals_csv, intervals_markdown, paired_differences, t_interval,
)

AXES = ["n_real", "arm"]
DICE = "eval:dice_mean"


def _run(n: str, arm: str, seed: int | None, dice: float | None, **more) -> dict:
    return {"n_real": n, "arm": arm, **({"seed": seed} if seed is not None else {}), DICE: dice, **more}


def test_t_interval_matches_a_hand_computation_and_scipy():
    values = [0.70, 0.72, 0.74]
    iv = t_interval(values)
    half = 4.302652729749464 * 0.02 / math.sqrt(3)  # t(0.975, 2 df) from the tables; sd 0.02
    assert (iv.n, iv.mean, iv.sd) == (3, pytest.approx(0.72), pytest.approx(0.02))
    assert (iv.lo, iv.hi) == (pytest.approx(0.72 - half), pytest.approx(0.72 + half))
    for level in (0.95, 0.8):
        ci = scipy_stats.ttest_1samp([0.61, 0.70, 0.66, 0.73], 0.0).confidence_interval(level)
        iv = t_interval([0.61, 0.70, 0.66, 0.73], level)
        assert (iv.lo, iv.hi, iv.level) == (pytest.approx(ci.low), pytest.approx(ci.high), level)


def test_t_interval_drops_missing_values_and_has_no_interval_below_two():
    assert t_interval([0.70, None, float("nan"), 0.74]) == t_interval([0.70, 0.74])
    assert t_interval([0.7, None]) == Interval(0.7, None, None, 1, None)
    assert t_interval([None, float("nan")]) == Interval(None, None, None, 0, None)
    with pytest.raises(ConfigError, match="0.95"):
        t_interval([0.7, 0.8], level=95)


def test_cell_table_has_one_row_per_cell_in_first_seen_order_with_its_seeds():
    runs = [_run("8", "real", 0, 0.70), _run("4", "real", 0, 0.60), _run("8", "real", 1, 0.72),
            _run("4", "real", 1, None), _run("8", "real", 2, 0.74), _run("4", "real", 2, 0.64)]
    rows = cell_table(runs, AXES, [DICE, "eval:absent"])
    assert [(r["n_real"], r["arm"], r["seeds"]) for r in rows] == [("8", "real", (0, 1, 2)), ("4", "real", (0, 1, 2))]
    assert rows[0][DICE] == t_interval([0.70, 0.72, 0.74])
    assert rows[1][DICE] == t_interval([0.60, 0.64])  # seed 1 logged no Dice
    assert rows[0]["eval:absent"].n == 0
    assert cell_table([], AXES, [DICE]) == []


def test_pairing_removes_what_each_seed_shares():
    """A constant offset per seed between arms: each cell's interval is wide, the paired one has zero width."""
    per_seed = {0: 0.55, 1: 0.70, 2: 0.85}
    runs = [_run("4", arm, s, v + gain) for s, v in per_seed.items() for arm, gain in (("real", 0), ("synth", .03))]
    cells = {r["arm"]: r[DICE] for r in cell_table(runs, AXES, [DICE])}
    assert cells["synth"].hi - cells["synth"].lo > 0.5
    (row,) = paired_differences(runs, AXES, [DICE], ("arm", "real"))
    diff = row[DICE]
    assert (row["arm"], row["vs"], row["seeds"], diff.seeds) == ("synth", "arm=real", (0, 1, 2), (0, 1, 2))
    assert (diff.interval.mean, diff.interval.n, diff.positive_fraction) == (pytest.approx(0.03), 3, 1.0)
    assert diff.interval.hi - diff.interval.lo == pytest.approx(0, abs=1e-12)


def test_paired_difference_is_scipys_paired_t_over_the_seeds_both_cells_have():
    real = {0: 0.60, 1: 0.66, 2: 0.61, 3: 0.70, 4: 0.65}
    synth = {0: 0.63, 1: 0.65, 2: 0.66, 3: None, 5: 0.9}  # seed 3 lacks the metric, 4 did not run, 5 has no pair
    runs = [_run("4", "real", s, v) for s, v in real.items()] + [_run("4", "synth", s, v) for s, v in synth.items()]
    (row,) = paired_differences(runs, AXES, [DICE], ("arm", "real"), level=0.9)
    diff = row[DICE]
    ci = scipy_stats.ttest_rel([0.63, 0.65, 0.66], [0.60, 0.66, 0.61]).confidence_interval(0.9)
    assert (diff.interval.lo, diff.interval.hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert (row["seeds"], diff.seeds, diff.positive_fraction) == ((0, 1, 2, 3), (0, 1, 2), pytest.approx(2 / 3))


def test_differences_pair_cells_on_the_other_axes_and_skip_cells_without_a_baseline():
    runs = [_run(n, arm, s, 0.5 + 0.01 * s + (0.1 if arm == "synth" else 0) + (0.2 if n == "8" else 0))
            for s in (0, 1) for n, arm in (("4", "real"), ("4", "synth"), ("8", "real"), ("8", "synth"),
                                           ("16", "synth"))]
    rows = paired_differences(runs, AXES, [DICE], ("arm", "real"))
    assert [(r["n_real"], r["arm"]) for r in rows] == [("4", "synth"), ("8", "synth")]
    assert [r[DICE].interval.mean for r in rows] == [pytest.approx(0.1), pytest.approx(0.1)]


def test_refusals_name_the_fix():
    runs = [_run("4", "real", 0, 0.6), _run("4", "synth", 0, 0.7)]
    with pytest.raises(ConfigError, match=r"baseline label 'base' is not on axis 'arm'; its labels are \['real'"):
        paired_differences(runs, AXES, [DICE], ("arm", "base"))
    with pytest.raises(ConfigError, match=r"baseline axis 'method' is not one of the axes"):
        paired_differences(runs, AXES, [DICE], ("method", "real"))
    with pytest.raises(ConfigError, match=r"axis 'method' is not a label of the runs; their axes are \['n_real', 'a"):
        cell_table(runs, ["n_real", "method"], [DICE])
    with pytest.raises(ConfigError, match="run #1 .* has no label on axis 'arm'"):
        cell_table([runs[0], {"n_real": "8", "seed": 0}], AXES, [DICE])
    with pytest.raises(ValueError, match="two runs of cell .* at seed 0; keep one"):
        cell_table(runs + [runs[0]], AXES, [DICE])


def test_markdown_shows_intervals_and_csv_numbers():
    runs = [_run("4", "real", 0, 0.70), _run("4", "real", 1, 0.72), _run("4", "real", 2, 0.74),
            _run("4", "synth", 0, 0.75), _run("4", "synth", 1, 0.71), _run("4", "synth", 2, None),
            _run("8", "real", 0, 0.80)]
    cells = cell_table(runs, AXES, [DICE])
    assert intervals_markdown(cells).splitlines() == [
        "| n_real | arm | seeds | eval:dice_mean |", "|---|---|---|---|",
        "| 4 | real | 0, 1, 2 | 0.720 [0.670, 0.770] |",
        "| 4 | synth | 0, 1, 2 | 0.730 [0.476, 0.984] (n=2) |",
        "| 8 | real | 0 | 0.800 — |"]
    rows = list(csv.DictReader(io.StringIO(intervals_csv(cells))))
    assert rows[0]["seeds"] == "0 1 2" and float(rows[0][f"{DICE}:lo"]) == pytest.approx(cells[0][DICE].lo)
    assert (rows[2][f"{DICE}:n"], rows[2][f"{DICE}:lo"], float(rows[2][DICE])) == ("1", "", 0.8)
    diffs = paired_differences(runs, AXES, [DICE], ("arm", "real"))
    # seeds 0 and 1 pair: 0.05 and -0.01, sd 0.0424, t(0.975, 1 df) 12.706 * 0.03
    assert intervals_markdown(diffs).splitlines()[2] == \
        "| 4 | synth | arm=real | 0, 1, 2 | +0.020 [-0.361, +0.401] (1/2 > 0) |"
    assert float(next(csv.DictReader(io.StringIO(intervals_csv(diffs))))[f"{DICE}:positive"]) == 0.5


def test_runs_without_seeds_are_one_replicate_each():
    rows = cell_table([_run("4", "real", None, 0.7)], AXES, [DICE])
    assert rows[0]["seeds"] == (None,) and rows[0][DICE] == Interval(0.7, None, None, 1, None)
    assert "| 0.700 — |" in intervals_markdown(rows)
