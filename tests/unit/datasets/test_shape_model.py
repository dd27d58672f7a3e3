"""The head-shape model: fitting (synthetic ellipses with known parameters, the real HC18 sample),
seeded sampling, rendering, JSON round trip, and the geometric augmentation of real masks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sonosynth.datasets.shape_model import (HeadShape, MaskAugmentConfig, ShapeModel, ShapeModelConfig, augment_mask,
                                            canonical, normalize, render, touches_border)
from sonosynth.trainers.evaluation.segmentation import fit_head


@pytest.mark.parametrize("frame,size", [("stretch", (96, 160)), ("pad", (96, 160)), ("pad", (128, 128))])
def test_one_ellipse_comes_back_from_its_mask(frame, size):
    h, w = size
    shape = HeadShape(0.45, 0.55, 0.3, 0.2, 0.7)
    if frame == "pad":  # the mask is the middle of the padded square the shape lives in
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        mask = render(shape, side, side)[top:top + h, left:left + w]
    else:
        mask = render(shape, h, w)
    got = normalize(fit_head(mask > 0), h, w, frame)
    assert got.cx == pytest.approx(0.45, abs=0.004) and got.cy == pytest.approx(0.55, abs=0.004)
    assert got.a == pytest.approx(0.3, abs=0.004) and got.b == pytest.approx(0.2, abs=0.004)
    assert got.theta == pytest.approx(0.7, abs=0.01)


def test_an_ellipse_has_one_canonical_name():
    a = canonical(0.5, 0.5, 0.1, 0.2, 0.3)
    assert (a.a, a.b) == (0.2, 0.1) and a.theta == pytest.approx(0.3 + math.pi / 2)
    assert canonical(0.5, 0.5, 0.2, 0.1, 0.3 + math.pi).theta == pytest.approx(0.3)
    assert (render(a, 64, 64) == render(canonical(0.5, 0.5, 0.2, 0.1, a.theta - math.pi), 64, 64)).all()


def known_masks(n: int, seed: int = 0, size: int = 128) -> list[np.ndarray]:
    """Heads with centre N(0.5, 0.05), log a N(log 0.25, 0.1), log b N(log 0.17, 0.1), angle N(0.6, 0.15)."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n):
        cx, cy = rng.normal(0.5, 0.05, 2)
        a, b = np.exp(rng.normal([math.log(0.25), math.log(0.17)], 0.1))
        masks.append(render(canonical(cx, cy, a, b, rng.normal(0.6, 0.15)), size, size))
    return masks


@pytest.fixture(scope="module")
def known_model() -> ShapeModel:
    return ShapeModel.fit(known_masks(200), source={"dataset": "synthetic"})


def test_fit_recovers_the_parameters_of_synthetic_heads(known_model):
    m = known_model
    assert m.n_masks == 200 and m.skipped == 0 and not m.partial_heads and m.border_fraction == 0
    mean, sd = np.asarray(m.mean), np.sqrt(np.diag(np.asarray(m.cholesky) @ np.asarray(m.cholesky).T))
    assert mean[:4] == pytest.approx([0.5, 0.5, math.log(0.25), math.log(0.17)], abs=0.015)
    assert sd[:4] == pytest.approx([0.05, 0.05, 0.1, 0.1], rel=0.2)
    draws = m.sample(np.random.default_rng(1), 4000)
    assert np.mean([d.cx for d in draws]) == pytest.approx(m.mean[0], abs=0.003)
    assert np.std([math.log(d.a) for d in draws]) == pytest.approx(sd[2], rel=0.1)
    assert np.median([d.theta for d in draws]) == pytest.approx(0.6, abs=0.05)
    assert np.mean([d.b / d.a for d in draws]) == pytest.approx(0.68, abs=0.05)


def test_sampling_is_deterministic_per_seed_and_survives_json(known_model, tmp_path):
    a = known_model.sample(np.random.default_rng(7), 5)
    assert a == known_model.sample(np.random.default_rng(7), 5)
    assert a != known_model.sample(np.random.default_rng(8), 5)
    known_model.save(tmp_path / "shape_model.json")
    back = ShapeModel.load(tmp_path / "shape_model.json")
    assert back.sha256() == known_model.sha256() and back.n_masks == 200 and back.source == {"dataset": "synthetic"}
    assert back.sample(np.random.default_rng(7), 5) == a
    assert (render(a[0], 64, 64) == render(back.sample(np.random.default_rng(7), 1)[0], 64, 64)).all()
    with pytest.raises(ValueError, match="not a sonosynth shape model.*shape_model.json"):
        ShapeModel.from_json('{"mean": [0]}')


def test_draws_stay_inside_unless_partial_heads_are_allowed():
    masks = known_masks(40)
    for i in range(0, 40, 4):  # a tenth of the heads cut by the left border
        masks[i] = render(HeadShape(0.08, 0.5, 0.25, 0.17, 0.3), 128, 128)
    auto = ShapeModel.fit(masks)
    assert auto.partial_heads and auto.border_fraction == pytest.approx(0.25)
    draws = auto.sample(np.random.default_rng(0), 300)
    assert any(touches_border(render(d, 64, 64)) for d in draws)
    assert all(auto.bounds["cx"][0] <= d.cx <= auto.bounds["cx"][1] for d in draws)
    kept = ShapeModel.fit(masks, ShapeModelConfig(partial_heads="forbid"))
    assert not kept.partial_heads
    assert not any(touches_border(render(d, 64, 64)) for d in kept.sample(np.random.default_rng(0), 300))
    with pytest.raises(ValueError, match="only 1 masks have a fittable head.*min_masks=5"):
        ShapeModel.fit([masks[1], np.zeros((64, 64), np.uint8)])


def test_fit_on_the_real_hc18_sample(shared_data):
    paths = sorted(Path(shared_data / "hc18_sample" / "mask").glob("*.png"))
    # the sample's annotations are closed ellipse outlines: fit_head fills them
    outlines = [np.asarray(Image.open(p).convert("L")) for p in paths]
    model = ShapeModel.fit(outlines, frame="stretch", source={"dataset": "hc18_sample"})
    assert model.n_masks == len(paths) == 40 and model.image_sizes == {"800x540": 40}
    cx, cy, log_a, log_b = np.asarray(model.mean)[:4]
    assert 0.35 < cx < 0.65 and 0.35 < cy < 0.65  # heads sit near the middle of HC18 images
    assert 0.1 < math.exp(log_b) < math.exp(log_a) < 0.45
    assert not model.partial_heads  # no head of the sample reaches the border
    for shape in model.sample(np.random.default_rng(3), 20):
        mask = render(shape, 270, 400)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255} and not touches_border(mask)
        assert model.bounds["log_a"][0] - 1e-9 <= math.log(shape.a) <= model.bounds["log_a"][1] + 1e-9


def test_mask_augmentation_is_geometric_seeded_and_off_when_zero():
    mask = render(HeadShape(0.5, 0.45, 0.3, 0.2, 0.3), 64, 64)
    cfg = MaskAugmentConfig()
    a = augment_mask(mask, cfg, 123)
    assert (a == augment_mask(mask, cfg, 123)).all() and (a != augment_mask(mask, cfg, 124)).any()
    assert set(np.unique(a)) == {0, 255} and abs(int(a.sum()) - int(mask.sum())) < 0.35 * mask.sum()
    flip = MaskAugmentConfig(hflip_prob=1, vflip_prob=0, rotate_deg=0, scale=0, shift=0)
    assert (augment_mask(mask, flip, 1) == mask[:, ::-1]).all()
    off = MaskAugmentConfig(hflip_prob=0, vflip_prob=0, rotate_deg=0, scale=0, shift=0)
    assert (augment_mask(mask, off, 5) == mask).all()
