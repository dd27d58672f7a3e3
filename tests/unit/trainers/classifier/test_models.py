"""Classifier backbones: every one builds, tiny ones run, weights round-trip through a folder."""

from __future__ import annotations

import json

import pytest
import torch

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.classifier.models import (
    GRAY_MEAN, IMAGENET_MEAN, IMAGENET_STD, ClassifierModelConfig, build_classifier, normalization, saved_labels,
)

LABELS = ["abdomen", "brain", "femur", "other", "thorax"]


def _cfg(**kw) -> ClassifierModelConfig:
    return build(ClassifierModelConfig, kw)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("backbone, millions", [
    ("resnet18", 11.18), ("mobilenet_v2", 2.23), ("efficientnet_b0", 4.01), ("densenet121", 6.96),
    ("densenet169", 12.49), ("vit_b16", 85.80),
])
def test_real_backbones_have_their_published_size(backbone, millions):
    # Parameter counts with a 5-class head (ImageNet's 1000-class heads are 0.5-1.3M larger).
    model = build_classifier(_cfg(backbone=backbone), LABELS)
    assert _params(model) / 1e6 == pytest.approx(millions, abs=0.02)
    assert model.num_labels == 5 and model.labels == LABELS


def test_resnet18_and_mobilenet_forward_at_small_size():
    for backbone in ("resnet18", "mobilenet_v2"):
        model = build_classifier(_cfg(backbone=backbone, image_size=64), LABELS).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("backbone", ["tiny_resnet", "tiny_vit", "tiny_densenet"])
def test_tiny_backbones_forward_and_train(backbone):
    model = build_classifier(_cfg(backbone=backbone, image_size=64), LABELS)
    assert _params(model) < 200_000
    logits = model(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 5) and logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 4])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_same_seed_same_weights_and_vit_other_input_size():
    a = build_classifier(_cfg(backbone="tiny_vit", image_size=32), LABELS)
    assert _same_weights(a, build_classifier(_cfg(backbone="tiny_vit", image_size=32), LABELS))
    assert not _same_weights(a, build_classifier(_cfg(backbone="tiny_vit", image_size=32, seed=1), LABELS))
    with torch.no_grad():  # position embeddings are interpolated for another input size
        assert a.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 5)


@pytest.mark.parametrize("backbone", ["tiny_resnet", "tiny_vit", "tiny_densenet"])
def test_save_pretrained_round_trip(backbone, tmp_path):
    model = build_classifier(_cfg(backbone=backbone, image_size=32, seed=3, pixel_mean=[0.3], pixel_std=[0.2]),
                             LABELS)
    model.save_pretrained(tmp_path / "m")
    assert saved_labels(tmp_path / "m") == LABELS
    again = build_classifier(_cfg(backbone=backbone, image_size=32, pretrained=str(tmp_path / "m")), LABELS)
    assert _same_weights(model, again)
    assert again.pixel_mean == (0.3, 0.3, 0.3) and again.pixel_std == (0.2, 0.2, 0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), again.eval()(x))
    # another label set: the backbone is kept, the head is new
    four = build_classifier(_cfg(backbone=backbone, image_size=32, pretrained=str(tmp_path / "m")), LABELS[:3] + [
        "thorax"])
    assert four.num_labels == 4
    body = {k: v for k, v in model.state_dict().items() if v.shape == four.state_dict()[k].shape}
    assert len(body) >= len(model.state_dict()) - 2
    assert all(torch.equal(v, four.state_dict()[k]) for k, v in body.items())


def test_torchvision_densenet_checkpoint_loads(tmp_path):
    model = build_classifier(_cfg(backbone="tiny_densenet", seed=5), LABELS)
    tv = {}  # torchvision's names: denselayerK.norm.1 (old files), classifier.*
    for k, v in model.net.state_dict().items():
        k = k.replace("class_layers.out.", "classifier.")
        for part in ("norm", "relu", "conv"):
            for i in "12":
                k = k.replace(f".layers.{part}{i}.", f".{part}.{i}.")
        tv[k] = v
    torch.save(tv, tmp_path / "densenet-tiny.pth")
    again = build_classifier(_cfg(backbone="tiny_densenet", pretrained=str(tmp_path / "densenet-tiny.pth")), LABELS)
    assert _same_weights(model.net.features, again.net.features)
    assert normalization(_cfg(backbone="tiny_densenet", pretrained=str(tmp_path))) == (IMAGENET_MEAN, IMAGENET_STD)


def test_missing_or_wrong_pretrained_paths_name_the_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ConfigError, match=f"model.pretrained {missing} does not exist"):
        build_classifier(_cfg(backbone="resnet18", pretrained=str(missing)), LABELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'empty'} has no config.json"):
        build_classifier(_cfg(backbone="tiny_resnet", pretrained=str(tmp_path / "empty")), LABELS)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'empty'} has no weights"):
        build_classifier(_cfg(backbone="tiny_densenet", pretrained=str(tmp_path / "empty")), LABELS)
    vit = tmp_path / "vit"
    build_classifier(_cfg(backbone="tiny_vit", image_size=32), LABELS).save_pretrained(vit)
    with pytest.raises(ConfigError, match=f"{vit} holds a 'vit' model, not 'resnet'"):
        build_classifier(_cfg(backbone="tiny_resnet", pretrained=str(vit)), LABELS)
    with pytest.raises(ConfigError, match=r"is not resnet18"):
        small = tmp_path / "small-resnet"
        build_classifier(_cfg(backbone="tiny_resnet"), LABELS).save_pretrained(small)
        build_classifier(_cfg(backbone="resnet18", pretrained=str(small)), LABELS)
    dense = tmp_path / "dense"
    build_classifier(_cfg(backbone="tiny_densenet"), LABELS).save_pretrained(dense)
    with pytest.raises(ConfigError, match=f"{dense / 'model.safetensors'} is not densenet121 weights"):
        build_classifier(_cfg(backbone="densenet121", pretrained=str(dense)), LABELS)
    (vit / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=f"model.pretrained {vit}: could not load"):
        build_classifier(_cfg(backbone="tiny_vit", pretrained=str(vit)), LABELS)


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="backbone"):
        _cfg(backbone="resnet50")
    with pytest.raises(ConfigError, match="multiple of 16 for vit_b16"):
        _cfg(backbone="vit_b16", image_size=100)
    with pytest.raises(ConfigError, match="must be a local folder"):
        _cfg(pretrained="s3://bucket/resnet")
    with pytest.raises(ConfigError, match="set both pixel_mean and pixel_std"):
        _cfg(pixel_mean=[0.5])
    with pytest.raises(ConfigError, match="num_labels is not set"):
        build_classifier(_cfg())
    with pytest.raises(ConfigError, match="num_labels is 3 but the label map has 5"):
        build_classifier(_cfg(num_labels=3), LABELS)
    assert build_classifier(_cfg(num_labels=3)).labels == ["class_0", "class_1", "class_2"]


def test_normalization_choice(tmp_path):
    assert normalization(_cfg()) == (GRAY_MEAN, (0.25,) * 3)
    assert normalization(_cfg(pixel_mean=[0.1, 0.2, 0.3], pixel_std=[1, 1, 1]))[0] == (0.1, 0.2, 0.3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert normalization(_cfg(pretrained=str(tmp_path))) == ((0.5,) * 3, (0.5,) * 3)  # google's ViT / MobileNetV2
    assert normalization(_cfg(pretrained=str(tmp_path / "elsewhere")))[0] == IMAGENET_MEAN
