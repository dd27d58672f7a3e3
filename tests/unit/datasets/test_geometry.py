from __future__ import annotations

import numpy as np
import pytest

from sonosynth.datasets.geometry import Ellipse, MaskError, fill_mask, iou
from sonosynth.datasets.phantom import PhantomConfig, make_phantom


def test_outline_fill_matches_known_phantom_geometry():
    cfg = PhantomConfig(planes=["brain", "abdomen", "thorax"], gap_prob=0.5, border_prob=0.3, seed=7)
    scores, gapped, border = [], 0, 0
    for i in range(60):
        s = make_phantom(i, cfg)
        filled, fig = fill_mask(s.outline)
        scores.append(iou(filled, s.filled))
        gapped += fig.outline_coverage < 0.97
        border += fig.touches_border
    assert min(scores) >= 0.98, sorted(scores)[:5]
    assert gapped >= 5 and border >= 5  # the hard cases really were exercised


def test_fit_recovers_the_phantom_ellipse():
    s = make_phantom(3, PhantomConfig(gap_prob=0, border_prob=0))
    _, fig = fill_mask(s.outline)
    e, t = fig.ellipse, s.ellipse
    assert abs(e.cx - t.cx) < 1 and abs(e.cy - t.cy) < 1
    assert sorted([e.a, e.b]) == pytest.approx(sorted([t.a, t.b]), abs=1.0)
    assert fig.was_outline and fig.fit_rmse_px < 2.5 and fig.outline_coverage > 0.97


def test_already_filled_mask_stays_filled():
    truth = Ellipse(50, 40, 30, 20, 0.3).inside((100, 120)).astype(np.uint8) * 255
    filled, fig = fill_mask(truth)
    assert iou(filled, truth) > 0.98 and not fig.was_outline


@pytest.mark.parametrize("kind", ["line", "specks", "corner"])
def test_non_ellipse_masks_are_rejected(kind):
    m = np.zeros((100, 100), np.uint8)
    if kind == "line":
        m[50:52, 10:90] = 255
    elif kind == "specks":
        m[np.random.default_rng(0).random((100, 100)) > 0.98] = 255
    else:
        m[20:80, 20:22] = 255
        m[20:22, 20:80] = 255
    with pytest.raises(MaskError) as err:
        fill_mask(m)
    assert err.value.reason == "mask_not_ellipse"


def test_empty_mask_is_rejected():
    with pytest.raises(MaskError) as err:
        fill_mask(np.zeros((50, 50), np.uint8))
    assert err.value.reason == "empty_mask"


def test_holes_and_none_methods():
    ring = Ellipse(50, 50, 30, 30, 0)
    outline = (ring.inside((100, 100), 1.5) & ~ring.inside((100, 100), -1.5)).astype(np.uint8) * 255
    holes, _ = fill_mask(outline, fill="holes")
    none, _ = fill_mask(outline, fill="none")
    assert holes[50, 50] == 255 and none[50, 50] == 0
