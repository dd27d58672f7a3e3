import numpy as np
import pytest
import torch

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.diffusion.data import LoraDataConfig, load_examples, pack, prompt_for


def cfg(**kw):
    return build(LoraDataConfig, {"dataset": "unused", "resolution": 32, **kw})


def test_joint_packs_image_image_mask():
    image = np.full((20, 40), 200, np.uint8)
    mask = np.zeros((20, 40), np.uint8)
    mask[5:15, 10:30] = 255
    x = pack(image, mask, cfg(mode="joint"))
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0], x[1])
    assert set(x[2].unique().tolist()) == {-1.0, 1.0}
    # padding keeps the aspect ratio: the top and bottom quarter are border
    assert x[0, :7].max() == -1 and x[0, 9:23, 4:28].min() > 0.5


def test_outline_mode_keeps_only_the_rim():
    image = np.zeros((64, 64), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 255
    filled = pack(image, mask, cfg(mode="joint"))[2] > 0
    rim = pack(image, mask, cfg(mode="joint", mask_channel="outline", outline_px=2))[2] > 0
    assert rim.sum() < filled.sum() / 3 and not rim[16, 16] and filled[16, 16] and rim[4, 16]


def test_class_mode_repeats_the_image():
    x = pack(np.arange(64, dtype=np.uint8).reshape(8, 8), None, cfg(mode="class"))
    assert torch.equal(x[0], x[2])


def test_prompts():
    c = cfg(mode="joint", prompt_template="fetal {plane}, {cohort} {missing}")
    assert prompt_for({"plane": "brain", "cohort": "hc18"}, c) == "fetal brain, hc18"
    assert prompt_for({"plane": "femur"}, cfg(mode="class")) == "a photo of fetal femur"
    with pytest.raises(ConfigError, match="unknown planes"):
        cfg(class_prompts={"heart": "x"})


def test_examples_from_a_real_dataset(tmp_path, make_phantom_dataset):
    data = make_phantom_dataset(tmp_path / "d", 16, ["brain", "femur"], size=64)
    joint = load_examples(cfg(dataset=str(data), split=None, mode="joint", limit=5))
    assert len(joint) == 5 and len({e.key for e in joint}) == 5
    per_class = load_examples(cfg(dataset=str(data), split=None, mode="class", per_class=3))
    assert sorted(e.plane for e in per_class) == ["brain"] * 3 + ["femur"] * 3
    with pytest.raises(ValueError, match="no samples of the planes.*class mode needs plane labels"):
        load_examples(cfg(dataset=str(data), split=None, mode="class", class_prompts={"thorax": "t"}))


def test_example_dataset_serves_cached_latents_or_pixels():
    from sonosynth.trainers.diffusion.data import Example, ExampleDataset

    examples = [Example(f"k{i}", torch.full((3, 4, 4), float(i)), "p", None) for i in range(3)]
    pixels = ExampleDataset(examples, [0, 0, 0])
    assert len(pixels) == 3 and torch.equal(pixels[2]["pixels"], examples[2].pixels)
    latents = (torch.arange(3.0)[:, None], torch.ones(3, 1))
    cached = ExampleDataset(examples, [0, 1, 0], latents, indices=[2, 1])
    assert len(cached) == 2 and cached[0]["index"] == 2 and cached[1]["prompt_row"] == 1
    assert cached[0]["latent_mean"].item() == 2.0 and "pixels" not in cached[0]
