import numpy as np
import pytest
import torch

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.diffusion.lora import LoraConfig, add_lora, lora_parameters, save_lora
from sonosynth.trainers.diffusion.models import (DiffusionModelConfig, build_components, build_pipeline,
                                                 byte_level_tokenizer)


def test_byte_level_tokenizer_needs_no_files():
    tok = byte_level_tokenizer(77)
    ids = tok("fetal héad").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "fetalhéad"


def test_tiny_model_is_a_function_of_its_config():
    a, b = build_components(DiffusionModelConfig()), build_components(DiffusionModelConfig())
    for x, y in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(x, y)
    other = DiffusionModelConfig(tiny={"seed": 1})
    assert other.identity() != DiffusionModelConfig().identity()
    assert not any(p.requires_grad for p in a.unet.parameters())


def test_pretrained_folder_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="not a diffusers Stable Diffusion folder.*stable-diffusion-v1-5"):
        build(DiffusionModelConfig, {"pretrained": str(tmp_path)})


def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("fetal head", height=64, width=64, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_lora_round_trips_through_the_diffusers_format(tmp_path):
    cfg = DiffusionModelConfig()
    lora = LoraConfig(rank=4, alpha=16, text_encoder=True)  # alpha != rank: scaling must survive
    parts = build_components(cfg)
    add_lora(parts.unet, parts.text_encoder, lora)
    trainable = lora_parameters(parts.unet) + lora_parameters(parts.text_encoder)
    assert trainable and all(p.requires_grad for p in trainable)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.2)
    trained = sample(build_pipeline(cfg, parts))
    save_lora(tmp_path, parts.unet, parts.text_encoder, lora)

    fresh = build_pipeline(cfg)
    base = sample(fresh)
    fresh.load_lora_weights(str(tmp_path))
    loaded = sample(fresh)
    np.testing.assert_allclose(loaded, trained, atol=1e-5)
    assert np.abs(loaded - base).max() > 1e-3
