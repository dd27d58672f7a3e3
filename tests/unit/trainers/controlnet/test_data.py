"""How a real HC18 annotation becomes the ControlNet's conditioning image, in training and in diffusers."""

import numpy as np
import pytest
import torch
from PIL import Image

from sonosynth.datasets.geometry import fill_mask
from sonosynth.trainers.controlnet.conditioning import mask_to_condition
from sonosynth.trainers.controlnet.data import GeometricAugment, GeometricAugmentConfig, condition_tensor, square_pair


@pytest.fixture(scope="module")
def hc18_pair(shared_data):
    folder = shared_data / "hc18_sample"
    image = np.asarray(Image.open(folder / "image" / "14_HC.png").convert("L"))
    outline = np.asarray(Image.open(folder / "mask" / "14_HC_Annotation.png").convert("L"))
    filled, _ = fill_mask(outline)  # what ingest stores: the filled head
    return image, filled


def test_real_hc18_mask_round_trips_through_the_condition(hc18_pair):
    from diffusers.image_processor import VaeImageProcessor

    image, filled = hc18_pair
    img, mask = square_pair(image, filled, 64, "pad")
    assert img.shape == mask.shape == (64, 64) and mask.dtype == bool
    cond = mask_to_condition(mask)
    assert cond.shape == (64, 64, 3) and cond.dtype == np.float32 and set(np.unique(cond)) == {0.0, 1.0}
    assert all(np.array_equal(cond[..., c] > 0.5, mask) for c in range(3))
    assert np.array_equal(mask_to_condition((mask * 255).astype(np.uint8)), cond)  # 0/255 masks the same
    h, w = filled.shape  # padded to square: the head keeps its share of the picture
    assert mask.mean() == pytest.approx((filled > 0).mean() * h / w, abs=0.02)
    # What training feeds the ControlNet is what diffusers' pipeline makes of the same condition.
    control = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    assert torch.equal(control.preprocess(cond, height=64, width=64)[0], condition_tensor(mask))


def test_augmentation_moves_image_and_mask_together_and_repeats_per_seed(hc18_pair):
    image, filled = hc18_pair
    img, mask = square_pair(image, filled, 64, "pad")
    aug = GeometricAugment(GeometricAugmentConfig(enabled=True, prob=1.0, rotate_deg=30), 64)
    head = mask.astype(np.float32)  # the mask as an image: it must land where the mask does
    a_img, a_mask = aug(head, mask, seed=7)
    again_img, again_mask = aug(head, mask, seed=7)
    assert np.array_equal(a_img, again_img) and np.array_equal(a_mask, again_mask)
    assert a_mask.dtype == bool and not np.array_equal(a_mask, mask)
    inter, union = np.logical_and(a_img > 0.5, a_mask).sum(), np.logical_or(a_img > 0.5, a_mask).sum()
    assert inter / union > 0.95
    other = aug(img, mask, seed=8)[1]
    assert not np.array_equal(other, a_mask)
