"""The quality stage's feature extractors (launch/quality/features.py), each loaded from local weights."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch

from sonosynth.infra.config import ConfigError
from sonosynth.launch.quality.config import FeaturesConfig
from sonosynth.launch.quality.features import build_extractor, square_batch, torch_fidelity_importable


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 40), dtype=np.uint8), rng.integers(0, 256, (32, 32), dtype=np.uint8),
            np.full((40, 56), 128, np.uint8)]


def test_square_batch_replicates_gray_and_crops_or_stretches():
    image = np.zeros((20, 40), np.uint8)
    image[:, 10:30] = 255
    crop = square_batch([image], 20, "center_crop")
    assert crop.shape == (1, 3, 20, 20) and torch.equal(crop[0, 0], crop[0, 2]) and float(crop.min()) == 1.0
    stretch = square_batch([image], 20, "stretch")
    assert 0.4 < float(stretch.mean()) < 0.6


def test_tiny_features_are_deterministic_per_seed(images):
    a = build_extractor(FeaturesConfig(kind="tiny", device="cpu"))
    feats = a(images)
    assert feats.shape == (3, 32) and feats.dtype == np.float64
    assert np.array_equal(feats, build_extractor(FeaturesConfig(device="cpu"))(images))
    other = build_extractor(FeaturesConfig(tiny={"seed": 1, "channels": [4, 6]}, device="cpu"))
    assert other(images).shape == (3, 6) and a.identity["kind"] == "tiny"


def test_resnet_folder_gives_pooled_features(images, tmp_path):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    net = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1])).eval()
    net.save_pretrained(tmp_path / "resnet")
    ex = build_extractor(FeaturesConfig(kind="resnet50", weights=str(tmp_path / "resnet"), image_size=32,
                                        batch_size=2, device="cpu"))
    feats = ex(images)
    x = (square_batch(images, 32, "stretch") - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net(pixel_values=x).pooler_output.flatten(1).double().numpy()
    assert feats.shape == (3, 12) and np.allclose(feats, want, atol=1e-5)
    assert len(ex.identity["sha256"]) == 64
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ConfigError, match="not a transformers ResNet folder"):
        build_extractor(FeaturesConfig(kind="resnet50", weights=str(tmp_path / "vit")))
    with pytest.raises(ConfigError, match="is not a local folder"):
        build_extractor(FeaturesConfig(kind="resnet50", weights=str(tmp_path / "nothing")))


def test_sam_encoder_from_a_checkpoint_or_a_train_sam_folder(images, tmp_path):
    from sonosynth.trainers.sam.models import SamModelConfig, build_sam
    from sonosynth.trainers.sam.train import SamTrainConfig, finetuned_payload

    sam = build_sam(SamModelConfig(arch="tiny", seed=3))
    torch.save(sam.state_dict(), tmp_path / "tiny.pth")
    from_pth = build_extractor(FeaturesConfig(kind="sam", weights=str(tmp_path / "tiny.pth"), sam_arch="tiny",
                                              device="cpu"))(images)
    assert from_pth.shape == (3, 32) and np.isfinite(from_pth).all()
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save(finetuned_payload(sam, "full"), folder / "sam_finetuned.pt")
    cfg = {"out": "x", "model": {"arch": "tiny", "seed": 3}, "data": {"sources": {"real": {"dataset": "d"}}}}
    from sonosynth.infra.config import build

    (folder / "config.yaml").write_text(build(SamTrainConfig, cfg).to_yaml())
    from_folder = build_extractor(FeaturesConfig(kind="sam", weights=str(folder), device="cpu"))(images)
    assert np.allclose(from_folder, from_pth, atol=1e-6)


def test_classifier_penultimate_features(images, tmp_path):
    from sonosynth.trainers.classifier.models import ClassifierModelConfig, build_classifier

    clf = build_classifier(ClassifierModelConfig(backbone="tiny_resnet", image_size=32), ["a", "b"])
    folder = clf.save_pretrained(tmp_path / "model")
    (folder / "classifier.json").write_text(json.dumps({
        "format": 1, "backbone": "tiny_resnet", "labels": ["a", "b"], "image_size": 32,
        "pixel_mean": list(clf.pixel_mean), "pixel_std": list(clf.pixel_std)}))
    ex = build_extractor(FeaturesConfig(kind="classifier", weights=str(folder), device="cpu"))
    feats = ex(images)
    from sonosynth.trainers.classifier.predict import load_classifier

    loaded = load_classifier(folder)
    with torch.no_grad():
        x = torch.stack([loaded.transform(im) for im in images])
        want = loaded.model.net.resnet(x).pooler_output.flatten(1).double().numpy()
    assert feats.shape == (3, 16) and np.allclose(feats, want, atol=1e-5)


@pytest.mark.skipif(torch_fidelity_importable(), reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_names_the_fix(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="pip install --no-deps torch-fidelity"):
        build_extractor(FeaturesConfig(kind="inception", weights=str(tmp_path / "w.pth")))


@pytest.mark.skipif(not torch_fidelity_importable(), reason="torch-fidelity is not installed (docs/quality.md)")
def test_inception_loads_a_local_state_dict(images, tmp_path):
    from sonosynth.launch.quality.features import fidelity_inception_class

    cls = fidelity_inception_class()
    # a random network of the same architecture: construction without reading weights
    with mock.patch.object(cls, "load_state_dict"), mock.patch.object(torch, "load", return_value={}):
        random = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused.pth")
    torch.save(random.state_dict(), tmp_path / "inception.pth")
    feats = build_extractor(FeaturesConfig(kind="inception", weights=str(tmp_path / "inception.pth"),
                                           batch_size=3, device="cpu"))(images)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
