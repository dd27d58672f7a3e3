"""Mask extraction and QC of joint-mode samples, on crafted RGB inputs."""

import numpy as np
import pytest

from sonosynth.datasets.geometry import Ellipse, iou
from sonosynth.datasets.synthetic import (EMPTY, HUGE, NOT_ELLIPSE, OFF_IMAGE, TINY, QCConfig, extract,
                                          extract_joint)

SIZE = 128


def rgb_with(mask: np.ndarray, red: int = 120, green: int = 60) -> np.ndarray:
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = red, green
    rgb[..., 2] = np.where(mask, 230, 20)
    return rgb


def ellipse(cx=64, cy=64, a=30, b=22, theta=0.4) -> np.ndarray:
    return Ellipse(cx, cy, a, b, theta).inside((SIZE, SIZE))


def test_a_good_head_passes_with_its_mask_filled():
    truth = ellipse()
    outline = truth & ~ellipse(a=27, b=19)  # only the rim drawn, as an outline model would
    for drawn in (truth, outline):
        ex = extract_joint(rgb_with(drawn), QCConfig())
        assert ex.reason is None, ex.detail
        assert iou(ex.mask, truth) > 0.9 and ex.qc["qc_fit_rmse_px"] < 1.5
        assert (ex.image == 120).all()


@pytest.mark.parametrize("drawn, cfg, reason", [
    (np.zeros((SIZE, SIZE), bool), QCConfig(), EMPTY),
    (ellipse(a=6, b=5), QCConfig(), TINY),
    (ellipse(a=60, b=55, theta=0), QCConfig(max_area_frac=0.5), HUGE),
    (ellipse(cx=10, cy=64), QCConfig(), OFF_IMAGE),
    (np.pad(np.ones((60, 10), bool), ((34, 34), (59, 59))) | np.pad(np.ones((10, 60), bool), ((59, 59), (34, 34))),
     QCConfig(), NOT_ELLIPSE),
    (ellipse(a=40, b=6, theta=0), QCConfig(), NOT_ELLIPSE),  # a sliver: axis ratio 0.15
])
def test_each_bad_mask_kind_is_rejected_with_its_reason(drawn, cfg, reason):
    ex = extract_joint(rgb_with(drawn), cfg)
    assert ex.reason == reason, ex.detail
    assert ex.detail


def test_border_contact_can_be_allowed():
    assert extract_joint(rgb_with(ellipse(cx=10, cy=64)), QCConfig(allow_border=True)).reason is None


def test_image_channel_choice():
    rgb = rgb_with(ellipse(), red=100, green=50)
    assert (extract_joint(rgb, QCConfig(image_channel="red_green")).image == 75).all()
    assert (extract(rgb, "class", QCConfig()).image == round((100 + 50 + 230) / 3)).any()
    assert extract(rgb, "class", QCConfig()).mask is None


def test_qc_limits_are_validated():
    with pytest.raises(ValueError, match="min_area_frac < max_area_frac"):
        QCConfig(min_area_frac=0.5, max_area_frac=0.4)
