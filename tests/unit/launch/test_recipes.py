"""Every shipped recipe resolves into its stage config; `extends` layers recipes."""

from __future__ import annotations

import pytest

from sonosynth.infra.config import ConfigError
from sonosynth.launch.recipes import packaged_recipes, resolve
from sonosynth.trainers.diffusion.train import LoraTrainConfig

LORA_RECIPES = sorted(p.stem for p in packaged_recipes().glob("lora_*.yaml"))


@pytest.mark.parametrize("name", LORA_RECIPES)
def test_lora_recipes_resolve(name):
    cfg = resolve(LoraTrainConfig, name, {}, ["model.pretrained=null"])
    assert cfg.lora.alpha is None  # alpha = rank in both papers


GENERATE_RECIPES = sorted(p.stem for p in packaged_recipes().glob("generate_*.yaml"))


@pytest.mark.parametrize("name", GENERATE_RECIPES)
def test_generate_recipes_resolve(name):
    from sonosynth.launch.generate.config import GenerateConfig

    cfg = resolve(GenerateConfig, name, {}, ["sampler.model.pretrained=null"])
    assert cfg.num_samples >= 1


def test_paper_a_sampling_recipe():
    from sonosynth.launch.generate.config import GenerateConfig

    cfg = resolve(GenerateConfig, "generate_joint_head_paper", {}, ["sampler.model.pretrained=null"])
    s = cfg.sampler
    assert (s.scheduler, s.steps, s.guidance, s.lora_scale, cfg.qc.threshold) == ("unipc", 30, 7.5, 0.9, 180)
    cfg = resolve(GenerateConfig, "generate_joint_head", {}, ["sampler.model.pretrained=null"])
    assert cfg.sampler.scheduler == "dpm++"


def test_paper_hyper_parameters():
    a = resolve(LoraTrainConfig, "lora_joint_head", {}, ["model.pretrained=null"])
    assert (a.lora.rank, a.optim.lr, a.optim.weight_decay, a.engine.epochs, a.data.limit) == (128, 1e-4, 1e-2, 100, 24)
    assert a.lora.unet_targets == ["to_q", "to_k", "to_v", "to_out.0"] and a.data.mode == "joint"
    ranks = {n: resolve(LoraTrainConfig, n, {}, ["model.pretrained=null"]).lora.rank
             for n in ("lora_class_planes", "lora_class_planes_r32", "lora_class_planes_r8")}
    assert ranks == {"lora_class_planes": 128, "lora_class_planes_r32": 32, "lora_class_planes_r8": 8}
    b = resolve(LoraTrainConfig, "lora_class_planes_r8", {}, ["model.pretrained=null"])
    assert (b.lora.text_encoder, b.text_encoder_lr, b.model.clip_skip, b.engine.seed, b.data.per_class) == \
        (True, 5e-5, 2, 1234, 20)
    assert b.out.endswith("r8") and not b.cache_text and b.cache.latents


def test_missing_model_folder_names_the_fix():
    with pytest.raises(ConfigError, match="(?s)model.*missing unet/, vae/.*point model.pretrained at a local copy"):
        resolve(LoraTrainConfig, "lora_joint_head", {}, [])


def test_recipes_cannot_extend_themselves(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\nout: x\n")
    with pytest.raises(ConfigError, match="extends itself"):
        resolve(LoraTrainConfig, str(loop), {}, [])
