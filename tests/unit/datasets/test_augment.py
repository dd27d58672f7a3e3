from __future__ import annotations

import numpy as np
import pytest
import torch

from sonosynth.datasets.augment import (
    SAM_PIXEL_MEAN, SAM_PIXEL_STD, AugmentConfig, PairedAugment, box_from_mask, boxes_to_input, build_transform,
    full_box, logit_target, sam_preprocess, tight_box,
)
from sonosynth.infra.config import ConfigError, build

H, W = 96, 128


def _l_shape() -> np.ndarray:
    """An asymmetric L: flips and rotations all move it somewhere else."""
    m = np.zeros((H, W), np.uint8)
    m[15:70, 20:38] = 1
    m[55:70, 20:75] = 1
    return m


def _image_of(mask: np.ndarray) -> np.ndarray:
    return np.where(mask > 0, 200, 30).astype(np.uint8)


def _iou(a, b) -> float:
    a, b = a > 0, b > 0
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("preset", ["weak", "strong"])
def test_boxes_follow_the_augmented_mask(preset):
    mask = _l_shape()
    aug = PairedAugment(preset, seed=7)
    moved, jitter = 0, 19
    scale = max(H, W) / 256
    for index in range(24):
        _, m = aug(_image_of(mask), mask, epoch=0, index=index)
        tight = tight_box(m)
        moved += not np.array_equal(tight, tight_box(mask))
        box = box_from_mask(m, jitter, np.random.default_rng(index))
        lo = np.clip(tight - jitter * scale * np.array([1, 1, -1, -1]), 0, [W - 1, H - 1] * 2)
        # each side is pushed outwards by 0..jitter px (at 256 px), clipped to the image
        assert np.all(box[:2] <= tight[:2] + 1e-4) and np.all(box[:2] >= lo[:2] - 1e-4)
        assert np.all(box[2:] >= tight[2:] - 1e-4) and np.all(box[2:] <= lo[2:] + 1e-4)
    assert moved >= 8  # most draws flip/rotate/deform the L, and the box moved with it


@pytest.mark.parametrize("preset", ["weak", "strong"])
def test_image_and_mask_get_the_same_geometric_transform(preset):
    mask = _l_shape()
    aug = PairedAugment(preset, seed=3)
    for index in range(16):
        img, m = aug(_image_of(mask), mask, epoch=2, index=index)
        assert img.dtype == np.float32 and 0.0 <= img.min() and img.max() <= 1.0
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        inside, outside = img[m > 0].mean(), img[m == 0].mean()
        bright = img > (inside + outside) / 2
        assert _iou(bright, m) > 0.85, (preset, index)
        if _iou(m, mask) < 0.7:  # the draw moved the L: the image moved the same way
            assert _iou(bright, mask) < 0.75


def test_draws_are_a_function_of_seed_epoch_and_index():
    mask = _l_shape()
    image = _image_of(mask)
    a, b = PairedAugment("strong", seed=1), PairedAugment("strong", seed=1)
    x1, m1 = a(image, mask, epoch=3, index=5)
    a(image, mask, epoch=0, index=0)  # other calls in between do not matter
    x2, m2 = b(image, mask, epoch=3, index=5)
    assert np.array_equal(x1, x2) and np.array_equal(m1, m2)
    x3, m3 = b(torch.from_numpy(image)[None], torch.from_numpy(mask)[None], epoch=3, index=5)  # reader layout
    assert np.array_equal(x1, x3) and np.array_equal(m1, m3)
    by_key = a(image, mask, epoch=3, index="phantom-s000-000005")
    assert np.array_equal(by_key[0], a(image, mask, epoch=3, index="phantom-s000-000005")[0])
    others = [a(image, mask, epoch=e, index=5)[0] for e in range(4, 10)]
    assert any(not np.array_equal(x1, o) for o in others)
    seeds = [PairedAugment("strong", seed=s)(image, mask, epoch=3, index=5)[0] for s in range(2, 8)]
    assert any(not np.array_equal(x1, o) for o in seeds)


def test_strong_differs_from_weak_and_none_is_the_identity():
    mask = _l_shape()
    image = _image_of(mask)
    weak_ops = {type(t).__name__ for t in build_transform("weak", (H, W)).transforms}
    strong_ops = {type(t).__name__ for t in build_transform("strong", (H, W)).transforms}
    assert {"RandFlipd", "RandGaussianNoised", "RandGaussianSmoothd"} <= weak_ops - strong_ops
    assert {"Rand2DElasticd", "RandCoarseDropoutd"} <= strong_ops - weak_ops
    weak, strong = PairedAugment("weak", seed=0), PairedAugment("strong", seed=0)
    differ = sum(not np.array_equal(weak(image, mask, index=i)[0], strong(image, mask, index=i)[0])
                 for i in range(8))
    assert differ == 8
    x, m = PairedAugment("none")(image, mask, index=3)
    assert np.array_equal(m, mask) and np.allclose(x, image / 255.0)
    with pytest.raises(ValueError, match="none, weak or strong"):
        PairedAugment("medium")
    with pytest.raises(ConfigError, match="preset"):
        build(AugmentConfig, {"preset": "medium"})


def test_box_from_mask_jitter_clipping_and_empty_masks():
    mask = np.zeros((256, 256), np.uint8)
    mask[100:150, 60:200] = 255
    assert np.array_equal(box_from_mask(mask, 0), [60, 100, 199, 149])
    rng = np.random.default_rng(0)
    boxes = np.stack([box_from_mask(mask, 19, rng) for _ in range(300)])
    push = (boxes - [60, 100, 199, 149]) * [-1, -1, 1, 1]
    assert push.min() == 0 and push.max() == 19 and np.allclose(push, np.round(push))
    assert len(np.unique(push[:, 0])) == 20  # every integer 0..19 is drawn
    edge = np.zeros((256, 256), np.uint8)
    edge[0:40, 230:256] = 1
    assert np.all(box_from_mask(edge, 19, rng) <= 255) and np.all(box_from_mask(edge, 19, rng) >= 0)
    assert box_from_mask(np.zeros((64, 64)), 19, rng) is None
    assert np.array_equal(full_box((64, 80)), [0, 0, 79, 63])
    big = np.zeros((512, 300), np.uint8)
    big[200:300, 100:200] = 1
    pushes = np.stack([box_from_mask(big, 19, rng) for _ in range(200)]) - [100, 200, 199, 299]
    assert np.abs(pushes).max() == pytest.approx(38)  # 19 px at 256 px is 38 px at 512 px
    assert np.array_equal(box_from_mask(mask, 19, np.random.default_rng(5)),
                          box_from_mask(mask, 19, np.random.default_rng(5)))


def test_sam_preprocess_resizes_the_longest_side_normalises_and_pads():
    image = np.full((54, 80), 128, np.uint8)
    x, (h, w) = sam_preprocess(image, 64)
    assert x.shape == (3, 64, 64) and (h, w) == (43, 64)  # SAM rounding: 54 * 64 / 80 = 43.2
    expected = (128 - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    assert torch.allclose(x[:, :h, :w].mean((1, 2)), expected, atol=1e-4)
    assert torch.count_nonzero(x[:, h:, :]) == 0 and torch.count_nonzero(x[:, :, w:]) == 0
    as_float, _ = sam_preprocess(image / 255.0, 64)
    assert torch.allclose(as_float, x, atol=1e-4)
    assert np.allclose(boxes_to_input(np.array([[0, 0, 79, 53]]), (54, 80), 64), [[0, 0, 63.2, 53 * 43 / 54]])


def test_logit_target_sits_where_the_image_sits():
    mask = np.zeros((54, 80), np.uint8)
    mask[:, 40:] = 1  # right half of the image
    t = logit_target(mask, 64, 32)
    assert t.shape == (1, 32, 32) and set(t.unique().tolist()) == {0.0, 1.0}
    rows = t[0].any(1).nonzero().flatten()
    assert rows.max() == 21 and t[0, :, :16].sum() == 0 and t[0, :21, 16:].all()

