"""The label map, the classifier transforms (seeded, shapes) and class-balanced picks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from sonosynth.datasets.manifest import to_table
from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.classifier.data import (
    ClassifierAugmentConfig, ClassifierTransform, LabelError, LabelMap, build_transforms, class_balanced_counts,
    class_balanced_keys, grayscale_stats, to_gray3,
)

FIVE = ["abdomen", "brain", "femur", "other", "thorax"]


def _rows(counts: dict[str, int], prefix: str = "fpdb") -> list[dict]:
    return [{"key": f"{prefix}-{plane}-{i:04d}", "plane": plane} for plane, n in counts.items() for i in range(n)]


def test_label_map_from_config_and_manifests(tmp_path, make_phantom_dataset):
    assert LabelMap.from_classes(["thorax", "brain", "brain", "abdomen"]).classes == ("abdomen", "brain", "thorax")
    fpdb = to_table(_rows({"brain": 2, "cervix": 1, "other": 1}))  # a pyarrow manifest
    syn = _rows({"femur": 1, "thorax": 1, "abdomen": 1}, "syn") + [{"key": "syn-x", "plane": None}]
    labels = LabelMap.from_manifests(fpdb, syn, exclude=["cervix"])
    assert list(labels) == FIVE and len(labels) == 5 and "cervix" not in labels
    assert labels.id2label[3] == "other" and labels.label2id["thorax"] == 4
    ds = make_phantom_dataset(tmp_path / "ph", 6, ["brain", "femur"])
    assert LabelMap.from_manifests(str(ds)).classes == ("brain", "femur")  # a dataset URI
    with pytest.raises(LabelError, match="sorted"):
        LabelMap(("brain", "abdomen"))
    with pytest.raises(LabelError, match="at least 2 classes"):
        LabelMap.from_classes(["brain"])


def test_label_map_survives_classes_missing_from_a_split():
    labels = LabelMap.from_classes(FIVE)  # the training job's map, with "other"
    africa_test = _rows({"abdomen": 2, "brain": 1, "femur": 1, "thorax": 3}, "africa")
    assert labels.encode(africa_test) == [0, 0, 1, 2, 4, 4, 4]  # same indices as in training
    assert labels.missing_from(africa_test) == ["other"]
    assert LabelMap.from_manifests(africa_test) != labels  # why the map must come from the job, not the split


def test_unknown_or_missing_label_names_the_key_and_the_label():
    labels = LabelMap.from_classes(FIVE)
    with pytest.raises(LabelError, match=r"sample fpdb-cervix-0000 has label 'cervix', which is not one of"):
        labels.encode(_rows({"brain": 1, "cervix": 1}))
    with pytest.raises(LabelError, match="sample syn-7 has no plane label"):
        labels.encode([{"key": "syn-7", "plane": None}])
    assert [r["plane"] for r in labels.select(_rows({"brain": 1, "cervix": 2}))] == ["brain"]


def test_class_balanced_counts_fu_lora_hb():
    es = _rows({"abdomen": 711, "brain": 1500, "femur": 1040, "other": 1800, "thorax": 1097})
    assert class_balanced_counts(es, 1150, seed=0) == {p: 230 for p in FIVE}
    uneven = class_balanced_counts(es, 1152, seed=0)
    assert sum(uneven.values()) == 1152 and sorted(uneven.values()) == [230, 230, 230, 231, 231]
    assert class_balanced_counts(es, 1152, seed=0) == uneven  # seeded
    assert {frozenset(k for k, v in class_balanced_counts(es, 1152, seed=s).items() if v == 231)
            for s in range(8)} != {frozenset(k for k, v in uneven.items() if v == 231)}
    # a scarce class gives all it has; the others share the rest
    scarce = class_balanced_counts(_rows({"abdomen": 50, "brain": 500, "femur": 500}), 650, seed=1)
    assert scarce == {"abdomen": 50, "brain": 300, "femur": 300}
    assert class_balanced_counts(es, 10, classes=["brain", "femur"]) == {"brain": 5, "femur": 5}
    with pytest.raises(ValueError, match="cannot pick 700 samples from 650"):
        class_balanced_counts(_rows({"abdomen": 50, "brain": 600}), 700)


def test_class_balanced_keys_are_seeded_and_balanced():
    es = _rows({"abdomen": 40, "brain": 90, "other": 70})
    keys = class_balanced_keys(es, 30, seed=3)
    assert keys == class_balanced_keys(list(reversed(es)), 30, seed=3)  # order of the rows does not matter
    assert keys != class_balanced_keys(es, 30, seed=4)
    assert Counter(k.split("-")[1] for k in keys) == {"abdomen": 10, "brain": 10, "other": 10}
    assert len(set(keys)) == 30
    # nested, as the mix's choice: a smaller total takes a subset of a larger one, class by class
    scarce = _rows({"abdomen": 7, "brain": 90, "other": 20})
    picks = [set(class_balanced_keys(scarce, n, seed=3, source="real")) for n in range(0, 118, 5)]
    assert all(a <= b for a, b in zip(picks, picks[1:]))
    assert class_balanced_keys(es, 30, seed=3, source="other") != keys  # each source its own draw


def _image(h=60, w=90, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def test_eval_transform_keeps_aspect_by_padding():
    t = ClassifierTransform(32, (0.5,) * 3, (0.25,) * 3)
    out = t(np.full((40, 80), 255, np.uint8))  # 2:1 -> 32 x 16 image centred on black
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[:, 8:24], torch.full((3, 16, 32), 2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(out[:, :8], torch.full((3, 8, 32), -2.0)) and torch.allclose(out[:, 24:], out[:, :8])
    assert torch.equal(out[0], out[2])  # grayscale replicated to 3 channels


def test_input_forms_and_rgb_are_converted_consistently():
    gray = _image()
    as_tensor = to_gray3(torch.from_numpy(gray)[None])
    assert torch.equal(to_gray3(gray), as_tensor) and as_tensor.shape == (3, 60, 90)
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)  # some Egyptian images are RGB
    from PIL import Image

    luma = np.array(Image.fromarray(rgb).convert("L"))  # what ingest stores
    assert (to_gray3(rgb)[0] * 255 - torch.from_numpy(luma).float()).abs().max() <= 1.0
    assert torch.equal(to_gray3(rgb), to_gray3(torch.from_numpy(rgb).permute(2, 0, 1)))
    with pytest.raises(ValueError, match="expected a grayscale or RGB image"):
        to_gray3(np.zeros((2, 5, 5, 5), np.uint8))


def test_paper_augmentation_is_seeded_per_sample_and_epoch():
    train, evaluate = build_transforms(48, (0.5,) * 3, (0.25,) * 3, ClassifierAugmentConfig(), seed=7)
    assert train.train and not evaluate.train
    image = _image(70, 100)
    a = train(image, index=3, epoch=1)
    assert a.shape == (3, 48, 48)
    assert torch.equal(a, train(image, index=3, epoch=1))
    assert torch.equal(a, ClassifierTransform(48, (0.5,) * 3, (0.25,) * 3, ClassifierAugmentConfig(), seed=7)(
        image, 3, 1))
    assert not torch.equal(a, train(image, index=4, epoch=1))
    assert not torch.equal(a, train(image, index=3, epoch=2))
    assert not torch.equal(a, build_transforms(48, (0.5,) * 3, (0.25,) * 3, ClassifierAugmentConfig(), 8)[0](
        image, 3, 1))
    state = torch.get_rng_state()
    train.batch([image, image], [0, 1])
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert train.batch([image, _image(30, 20)], [0, 1]).shape == (2, 3, 48, 48)
    shrunk = ClassifierTransform(48, (0.5,) * 3, (0.25,) * 3, ClassifierAugmentConfig(max_side=64))
    assert shrunk(image, 0).shape == (3, 48, 48)


def test_flip_draws_are_flips():
    # no rotation, full-image crop of a square image: every draw is the image or its mirror
    cfg = ClassifierAugmentConfig(rotate_deg=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    t = ClassifierTransform(32, (0.0,) * 3, (1.0,) * 3, cfg, seed=0)
    image = _image(32, 32)
    plain = to_gray3(image)
    flipped = 0
    for i in range(12):
        out = t(image, i)
        same, mirror = torch.allclose(out, plain, atol=1e-5), torch.allclose(out, plain.flip(-1), atol=1e-5)
        assert same or mirror
        flipped += mirror
    assert 0 < flipped < 12
    off = ClassifierTransform(32, (0.0,) * 3, (1.0,) * 3, ClassifierAugmentConfig(preset="none"))
    assert not off.train and torch.allclose(off(image, 5), plain, atol=1e-6)


def test_grayscale_stats_and_config_errors():
    mean, std = grayscale_stats([np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)])
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one image"):
        grayscale_stats([])
    with pytest.raises(ConfigError, match="crop_scale must be"):
        build(ClassifierAugmentConfig, {"crop_scale": [0.5, 0.1]})
    with pytest.raises(ConfigError, match="preset"):
        build(ClassifierAugmentConfig, {"preset": "strong"})
