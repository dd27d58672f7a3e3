from __future__ import annotations

import numpy as np
import pytest

from sonosynth.datasets.phantom import PhantomConfig, make_phantom
from sonosynth.infra.config import ConfigError, build


def test_phantom_is_deterministic_per_seed_and_index():
    a = make_phantom(5, PhantomConfig(num=10))
    b = make_phantom(5, PhantomConfig(num=1000))
    c = make_phantom(5, PhantomConfig(seed=1))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.filled, b.filled)
    assert not np.array_equal(a.image, c.image)


def test_phantom_planes_masks_and_patients():
    cfg = PhantomConfig(planes=["brain", "femur"], images_per_patient=2, height=128, width=160)
    s = [make_phantom(i, cfg) for i in range(4)]
    assert [x.plane for x in s] == ["brain", "femur", "brain", "femur"]
    assert s[0].image.shape == (128, 160) and s[0].image.dtype == np.uint8
    assert s[1].outline is None and s[1].filled is None
    assert s[0].patient_id == s[1].patient_id != s[2].patient_id
    # the skull is brighter than the head interior: the image is not noise
    inside = s[0].filled > 0
    assert s[0].image[inside].std() > 5 and s[0].outline[inside].any()


def test_bad_phantom_config_names_the_fix():
    with pytest.raises(ConfigError, match="choose from brain"):
        build(PhantomConfig, {"planes": ["kidney"]})
