"""The sweep's plot: a metric against a numeric axis, one line and interval band per arm, a reference line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sonosynth.infra.config import ConfigError
from sonosynth.launch.sweep.plots import metric_figure, plot_metric_vs_axis
from sonosynth.launch.sweep.stats import cell_table, paired_differences

DICE = "eval:dice_mean"
AXES = ["n_real", "arm"]


def _cells(counts=("4", "8", "16"), arms=("real", "synthetic")) -> list[dict]:
    runs = [{"n_real": n, "arm": arm, "seed": s, DICE: 0.5 + 0.01 * i + 0.05 * j + 0.02 * s}
            for s in (0, 1, 2) for i, n in enumerate(counts) for j, arm in enumerate(arms)]
    return cell_table(runs, AXES, [DICE])


def test_the_plot_is_an_800_px_png(tmp_path):
    path = plot_metric_vs_axis(_cells(), "n_real", DICE, tmp_path / "dice.png", title="Dice vs N_real",
                               reference={"label": "box prompt alone", "value": 0.8, "lo": 0.78, "hi": 0.82})
    assert path == tmp_path / "dice.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (800, 540)


def test_one_line_and_one_band_per_arm_spanning_the_intervals():
    cells = _cells()
    ax = metric_figure(cells, "n_real", DICE).axes[0]
    assert [line.get_label() for line in ax.lines] == ["real", "synthetic"]
    assert len(ax.collections) == 2  # fill_between bands
    real = [row[DICE] for row in cells if row["arm"] == "real"]
    band_y = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band_y.min() == pytest.approx(min(iv.lo for iv in real))
    assert band_y.max() == pytest.approx(max(iv.hi for iv in real))
    assert list(ax.lines[0].get_xdata()) == [4, 8, 16] and ax.get_xscale() == "linear"
    assert "95% t interval" in ax.get_legend().get_title().get_text()


def test_reference_is_a_dashed_line_with_its_band():
    ax = metric_figure(_cells(), "n_real", DICE, reference={"label": "box prompt alone", "value": 0.8,
                                                            "lo": 0.78, "hi": 0.82}).axes[0]
    (reference,) = [line for line in ax.lines if line.get_label() == "box prompt alone"]
    assert reference.get_linestyle() == "--" and list(reference.get_ydata()) == [0.8, 0.8]
    span_y = [p.get_path().transformed(p.get_patch_transform()).vertices[:, 1] for p in ax.patches
              if p.get_alpha() == pytest.approx(0.12)]
    assert len(span_y) == 1 and (span_y[0].min(), span_y[0].max()) == (pytest.approx(0.78), pytest.approx(0.82))


def test_counts_over_a_decade_are_on_a_log_axis_and_differences_plot_too():
    cells = _cells(counts=("5", "50", "500"))
    assert metric_figure(cells, "n_real", DICE).axes[0].get_xscale() == "log"
    runs = [{"n_real": row["n_real"], "arm": row["arm"], "seed": 0, DICE: row[DICE].mean} for row in cells]
    ax = metric_figure(paired_differences(runs, AXES, [DICE], ("arm", "real")), "n_real", DICE).axes[0]
    assert [line.get_label() for line in ax.lines] == ["synthetic"]
    assert np.allclose(ax.lines[0].get_ydata(), 0.05) and ax.get_ylabel() == f"{DICE} minus arm=real"


def test_non_numeric_axis_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"x axis 'arm' has labels that are not numbers \(\['real', 'synthetic'\]\); "
                                          r"plot against an axis with numeric labels such as n_real"):
        metric_figure(_cells(), "arm", DICE)
    with pytest.raises(ConfigError, match="metric 'eval:hd95' is not in the cells; they have"):
        metric_figure(_cells(), "n_real", "eval:hd95")
