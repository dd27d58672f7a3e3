import pytest
import torch

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.diffusion.lora import LoraConfig, add_lora
from sonosynth.trainers.diffusion.models import DiffusionModelConfig, build_components
from sonosynth.trainers.diffusion.train import LoraDiffusionModule, LoraTrainConfig, encode_prompt_ids


def test_cached_latents_give_the_same_loss_as_encoding_every_step():
    parts = build_components(DiffusionModelConfig())
    add_lora(parts.unet, parts.text_encoder, LoraConfig(rank=4))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    ids = parts.tokenizer(["fetal head"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    emb = encode_prompt_ids(parts.text_encoder, ids, clip_skip=2)
    scaling = parts.vae.config.scaling_factor
    live = LoraDiffusionModule(parts.unet, None, parts.vae, parts.noise_scheduler, 2, scaling)
    cached = LoraDiffusionModule(parts.unet, None, None, parts.noise_scheduler, 2, scaling)
    with torch.no_grad():
        dist = parts.vae.encode(pixels).latent_dist
        a = live({"pixels": pixels, "text_emb": emb}, torch.Generator().manual_seed(3))
        b = cached({"latent_mean": dist.mean, "latent_std": dist.std, "text_emb": emb},
                   torch.Generator().manual_seed(3))
        c = cached({"latent_mean": dist.mean, "latent_std": dist.std, "text_emb": emb},
                   torch.Generator().manual_seed(4))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert c.item() != pytest.approx(b.item(), rel=1e-3)


def test_text_cache_cannot_be_forced_with_a_text_encoder_lora():
    with pytest.raises(ConfigError, match="set cache.text to null"):
        build(LoraTrainConfig, {"out": "o", "data": {"dataset": "d"}, "lora": {"text_encoder": True},
                                "cache": {"text": True}})
    cfg = build(LoraTrainConfig, {"out": "o", "data": {"dataset": "d"}, "lora": {"text_encoder": True}})
    assert cfg.cache_text is False
