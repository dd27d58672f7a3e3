from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sonosynth.datasets.geometry import Ellipse
from sonosynth.trainers.evaluation.segmentation import (
    Reference, box_ellipse, dice_iou, draw_boxes, hd95, head_circumference, score_image, score_names, summarize,
)


def _squares():
    a = np.zeros((64, 80), bool)
    a[10:30, 10:30] = True  # 400 px
    b = np.zeros((64, 80), bool)
    b[15:35, 20:40] = True  # 400 px; overlap 15 x 10 = 150 px
    return a, b


def test_dice_and_iou_of_two_squares_with_known_overlap():
    a, b = _squares()
    dice, iou = dice_iou(a, b)
    assert dice == pytest.approx(2 * 150 / 800) and iou == pytest.approx(150 / 650)
    assert dice_iou(a, a) == (1.0, 1.0)


def test_dice_and_iou_equal_monai():
    from monai.metrics import compute_dice, compute_iou

    rng = np.random.default_rng(0)
    for _ in range(5):
        p, g = rng.random((40, 50)) > 0.6, rng.random((40, 50)) > 0.5
        pt, gt = (torch.from_numpy(x).float()[None, None] for x in (p, g))
        dice, iou = dice_iou(p, g)
        assert dice == pytest.approx(float(compute_dice(pt, gt, include_background=True)), abs=1e-6)
        assert iou == pytest.approx(float(compute_iou(pt, gt, include_background=True)), abs=1e-6)


@pytest.mark.parametrize("shift", [3, 8])
def test_hd95_of_a_shifted_disk_is_the_shift(shift):
    disk = Ellipse(60, 50, 25, 25, 0).inside((100, 140))
    moved = Ellipse(60 + shift, 50, 25, 25, 0).inside((100, 140))
    assert hd95(disk, moved) == pytest.approx(shift, abs=1.0)
    assert hd95(disk, disk) == 0.0
    ref = Reference(disk, pixel_size_mm=0.2)
    scores = ref.score(moved)
    assert scores["hd95_mm"] == pytest.approx(scores["hd95_px"] * 0.2)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.3])
def test_head_circumference_of_an_ellipse_with_known_axes(theta):
    e = Ellipse(100.3, 80.6, 60, 35, theta)
    assert head_circumference(e.inside((170, 210))) == pytest.approx(e.perimeter, rel=0.01)
    h = ((60 - 35) / (60 + 35)) ** 2  # Ramanujan's perimeter, by hand
    assert e.perimeter == pytest.approx(math.pi * 95 * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h))))
    # a stray speck does not move the head's ellipse
    noisy = e.inside((170, 210))
    noisy[2:5, 2:5] = True
    assert head_circumference(noisy) == pytest.approx(e.perimeter, rel=0.01)


def test_hc_error_in_px_and_mm():
    truth, pred = Ellipse(80, 60, 40, 30, 0.2), Ellipse(80, 60, 44, 30, 0.2)
    scores = Reference(truth.inside((120, 160)), pixel_size_mm=0.1).score(pred.inside((120, 160)))
    assert scores["hc_abs_err_px"] == pytest.approx(pred.perimeter - truth.perimeter, abs=1.5)
    assert scores["hc_abs_err_mm"] == pytest.approx(scores["hc_abs_err_px"] * 0.1)


def test_empty_masks_follow_the_convention():
    empty, (a, _) = np.zeros((64, 80), bool), _squares()
    assert dice_iou(empty, empty) == (1.0, 1.0) and hd95(empty, empty) == 0.0
    assert dice_iou(a, empty) == (0.0, 0.0) and dice_iou(empty, a) == (0.0, 0.0)
    assert hd95(a, empty) == pytest.approx(math.hypot(64, 80)) == hd95(empty, a)
    assert head_circumference(empty) is None
    s = Reference(a).score(empty)
    assert s["dice_256"] == 0.0 and s["hd95_px_256"] == pytest.approx(math.hypot(256, 256))
    assert s["hc_abs_err_px"] is None and s["hc_pred_px"] is None
    rng = np.random.default_rng(0)
    for gt, pred in ((empty, empty), (empty, a), (a, empty)):
        row = score_image(gt, pred, draw_boxes(gt, 3, 19, rng), pixel_size_mm=0.1)
        summary = summarize([row, row])
        json.dumps(summary, allow_nan=False)  # no NaN anywhere
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in row.values())
    row = score_image(empty, empty, draw_boxes(empty, 2, 19, rng))
    assert row["dice"] == 1.0 and row["gt_empty"] and row["pred_empty"] and row["box_baseline_dice"] == 0.0


def test_box_baseline_is_the_ellipse_inscribed_in_the_box():
    e = Ellipse(70, 50, 40, 25, 0.0)
    gt = e.inside((100, 140))
    rng = np.random.default_rng(1)
    tight = draw_boxes(gt, 1, 0, rng)[0]
    assert np.array_equal(tight, [30, 25, 110, 75])
    assert dice_iou(box_ellipse(tight, gt.shape), gt)[0] > 0.97
    row = score_image(gt, gt, draw_boxes(gt, 5, 19, rng))
    assert row["dice"] == 1.0 and len(row["box_baseline_dice_by_draw"]) == 5
    assert row["box_baseline_dice"] == pytest.approx(np.mean(row["box_baseline_dice_by_draw"]))
    assert row["box_baseline_dice_draw_std"] == pytest.approx(np.std(row["box_baseline_dice_by_draw"]))
    assert 0.5 < row["box_baseline_dice"] < 0.97  # jittered boxes are loose


def test_one_prediction_per_box_draw_is_averaged():
    gt = Ellipse(70, 50, 30, 20, 0.0).inside((100, 140))
    preds = np.stack([gt, np.zeros_like(gt)])
    row = score_image(gt, preds, draw_boxes(gt, 2, 19, np.random.default_rng(0)))
    assert row["dice"] == 0.5 and row["dice_by_draw"] == [1.0, 0.0] and row["dice_draw_std"] == 0.5
    assert row["hc_abs_err_px"] == 0.0  # the empty draw has no HC and is left out of its mean
    with pytest.raises(ValueError, match="one per box"):
        score_image(gt, np.stack([gt] * 3), draw_boxes(gt, 2, 19, np.random.default_rng(0)))


def test_summary_means_stds_and_draw_spread():
    gt = Ellipse(70, 50, 30, 20, 0.0).inside((100, 140))
    half = gt.copy()
    half[:, 70:] = False
    rng = np.random.default_rng(0)
    rows = [score_image(gt, p, draw_boxes(gt, 3, 19, rng), resolution=128) for p in (gt, half, gt)]
    s = summarize(rows, resolution=128)
    dices = [r["dice"] for r in rows]
    assert s["n_images"] == 3 and s["dice_mean"] == pytest.approx(np.mean(dices))
    assert s["dice_std"] == pytest.approx(np.std(dices, ddof=1)) and s["dice_median"] == 1.0
    assert "dice_128_mean" in s and "dice_256_mean" not in s and s["hd95_mm_mean"] is None
    per_draw = np.array([r["box_baseline_dice_by_draw"] for r in rows]).mean(0)
    assert s["box_baseline_dice_draws_std"] == pytest.approx(per_draw.std())
    assert s["dice_draws_std"] == 0.0 and s["hc_n"] == 3
    assert set(score_names(128)) >= {"dice_128", "iou_128", "hd95_px_128"}
    assert summarize([])["dice_mean"] is None
