from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.sam.models import (
    SamModelConfig, build_sam, embed, postprocess, predict_masks, sam_forward, sam_modeling,
)


def _tiny(**kw) -> SamModelConfig:
    return build(SamModelConfig, {"arch": "tiny", **kw})


def test_modeling_imports_without_torchvision():
    m = sam_modeling()
    for name in ("Sam", "ImageEncoderViT", "PromptEncoder", "MaskDecoder", "TwoWayTransformer"):
        assert hasattr(m, name)
    assert sam_modeling() is m  # a second call reuses the loaded module
    # build_sam (no torchvision either) imports through the same package
    assert hasattr(importlib.import_module("segment_anything.build_sam"), "build_sam_vit_b")


def test_tiny_model_is_a_function_of_its_config_and_seed():
    a, b, c = build_sam(_tiny()), build_sam(_tiny()), build_sam(_tiny(seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert isinstance(a, sam_modeling().Sam) and not a.training


def test_checkpoint_round_trip_through_the_config(tmp_path):
    original = build_sam(_tiny(seed=3))
    path = tmp_path / "tiny.pth"
    torch.save(original.state_dict(), path)
    loaded = build_sam(_tiny(seed=99, checkpoint=str(path)))
    ref = original.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    # fine-tuning scripts often nest the weights under "model"
    torch.save({"model": original.state_dict(), "epoch": 3}, tmp_path / "nested.pth")
    nested = build_sam(_tiny(checkpoint=str(tmp_path / "nested.pth")))
    assert torch.equal(nested.mask_decoder.iou_token.weight, original.mask_decoder.iou_token.weight)


def test_missing_or_mismatched_checkpoint_names_the_path_and_arch(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.pth does not exist.*tiny"):
        build_sam(_tiny(checkpoint=str(tmp_path / "nope.pth")))
    path = tmp_path / "wide.pth"
    torch.save(build_sam(_tiny(tiny={"embed_dim": 48})).state_dict(), path)
    with pytest.raises(ConfigError) as err:
        build_sam(_tiny(checkpoint=str(path)))
    msg = str(err.value)
    assert str(path) in msg and "does not fit arch tiny" in msg and "shapes differ" in msg
    assert "embed_dim 48" in msg  # what the file looks like
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not be read"):
        build_sam(_tiny(checkpoint=str(tmp_path / "junk.pth")))


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        build(SamModelConfig, {"tiny": {"image_size": 60}})
    with pytest.raises(ConfigError, match="block numbers"):
        build(SamModelConfig, {"tiny": {"global_attn_indexes": [5]}})
    with pytest.raises(ConfigError, match="local .pth"):
        build(SamModelConfig, {"arch": "vit_b", "checkpoint": "s3://bucket/sam.pth"})
    with pytest.raises(ConfigError, match="arch"):
        build(SamModelConfig, {"arch": "vit_x"})


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_real_archs_match_segment_anything(arch):
    """Same keys and shapes as segment_anything's builders, so Meta's checkpoints load."""
    builders = importlib.import_module("segment_anything.build_sam")
    with torch.device("meta"):  # shapes only: no memory, no init time
        ref = getattr(builders, f"build_sam_{arch}")()
        ours = build_sam(SamModelConfig(arch=arch))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    if arch == "vit_b":
        assert count == 93_735_472  # SAM ViT-B
    assert ours.image_encoder.img_size == 1024 and SamModelConfig(arch=arch).image_size == 1024


def test_real_vit_b_checkpoint_from_segment_anything_loads(tmp_path):
    ref = importlib.import_module("segment_anything.build_sam").build_sam_vit_b()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(ref.state_dict(), path)
    ours = build_sam(SamModelConfig(arch="vit_b", checkpoint=str(path)))
    assert torch.equal(ours.mask_decoder.iou_token.weight, ref.mask_decoder.iou_token.weight)
    with pytest.raises(ConfigError, match=r"does not fit arch tiny.*looks like vit_b"):
        build_sam(_tiny(checkpoint=str(path)))


def test_forward_trains_the_decoder_only_and_postprocesses():
    sam = build_sam(_tiny())
    sam.requires_grad_(False)  # what train-sam's mode decoder trains (paper A)
    sam.mask_decoder.requires_grad_(True)
    assert all(p.requires_grad for p in sam.mask_decoder.parameters())
    assert not any(p.requires_grad for p in sam.image_encoder.parameters())
    images = torch.randn(3, 3, 64, 64)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [0.0, 0.0, 63.0, 63.0], [10.0, 10.0, 20.0, 30.0]])
    emb = embed(sam, images)
    assert emb.shape == (3, 32, 8, 8) and not emb.requires_grad
    logits = sam_forward(sam, images, boxes)
    assert logits.shape == (3, 1, 32, 32)
    again = sam_forward(sam, None, boxes, image_embeddings=emb)
    assert torch.allclose(logits, again)
    # batched decoding equals decoding each image alone
    alone = sam_forward(sam, images[1:2], boxes[1:2])
    assert torch.allclose(logits[1:2], alone, atol=1e-5)
    logits.sum().backward()
    assert sam.mask_decoder.output_upscaling[0].weight.grad is not None
    assert sam.image_encoder.patch_embed.proj.weight.grad is None
    full = postprocess(sam, logits.detach(), (48, 64), (96, 128))
    assert full.shape == (3, 1, 96, 128)
    with pytest.raises(ValueError, match="one box per image"):
        sam_forward(sam, images, boxes[:2])


def test_predict_masks_on_a_native_image():
    sam = build_sam(_tiny())
    image = np.random.default_rng(0).integers(0, 255, (54, 80), dtype=np.uint8)
    masks = predict_masks(sam, image, np.array([[10, 5, 60, 40], [0, 0, 79, 53]], np.float32))
    assert masks.shape == (2, 54, 80) and masks.dtype == bool
