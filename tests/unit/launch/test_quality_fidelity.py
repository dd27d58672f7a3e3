"""Mask-shape statistics and their distances (launch/quality/fidelity.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sonosynth.datasets.geometry import Ellipse
from sonosynth.launch.quality.fidelity import shape_distances, shape_stats


def test_shape_statistics_of_an_ellipse():
    mask = Ellipse(40.0, 24.0, 18.0, 9.0, math.radians(30)).inside((48, 80)).astype(np.uint8) * 255
    stats = shape_stats(mask)
    assert stats["area_frac"] == pytest.approx(math.pi * 18 * 9 / (48 * 80), rel=0.05)
    assert stats["axis_ratio"] == pytest.approx(0.5, abs=0.05)
    assert stats["centre_x"] == pytest.approx(0.5, abs=0.01) and stats["centre_y"] == pytest.approx(0.5, abs=0.01)
    # image y points down: an ellipse turned 30 degrees towards +y
    assert stats["angle_deg"] == pytest.approx(30, abs=3)
    assert shape_stats(np.zeros((8, 8), np.uint8)) == {"area_frac": 0.0, "axis_ratio": None, "centre_x": None,
                                                      "centre_y": None, "angle_deg": None}


def test_shape_distance_treats_the_angle_as_axial():
    rng = np.random.default_rng(0)
    real = [{"area_frac": a, "angle_deg": t % 180} for a, t in zip(rng.uniform(0.1, 0.3, 50), rng.normal(179, 2, 50))]
    same = [{"area_frac": a, "angle_deg": t % 180} for a, t in zip(rng.uniform(0.1, 0.3, 50), rng.normal(1, 2, 50))]
    table = shape_distances(real, same)
    # 179 and 1 degrees are 2 degrees apart, not 178
    assert table["shape_stats"]["angle_deg"]["distance"] < 1.5
    assert table["shape_stats"]["axis_ratio"]["distance"] is None
    shifted = [{"area_frac": r["area_frac"] + 0.3, "angle_deg": (r["angle_deg"] + 60) % 180} for r in real]
    far = shape_distances(real, shifted)
    assert far["shape_stats"]["area_frac"]["distance"] > 4 and far["shape_stats"]["angle_deg"]["distance"] > 10
    assert far["shape_distance"] == pytest.approx(np.mean([far["shape_stats"][n]["distance"]
                                                           for n in ("area_frac", "angle_deg")]))
