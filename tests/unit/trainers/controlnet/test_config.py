"""train-controlnet's config: recipes resolve, and a wrong setting fails naming its fix."""

import pytest

from sonosynth.infra.config import ConfigError, build
from sonosynth.launch.recipes import resolve
from sonosynth.trainers.controlnet.train import ControlNetTrainConfig


def config(**fields) -> ControlNetTrainConfig:
    return build(ControlNetTrainConfig, {"out": "o", "data": {"dataset": "d"}, **fields})


def test_recipes_resolve_with_the_stage_names():
    tiny = resolve(ControlNetTrainConfig, "controlnet_tiny", {}, [])
    assert (tiny.data.resolution, tiny.engine.workers, tiny.model.pretrained) == (64, 2, None)
    assert tiny.caches_latents and tiny.registered_model == "sonosynth-controlnet"
    assert ControlNetTrainConfig.stage_name() == "train-controlnet"
    head = resolve(ControlNetTrainConfig, "controlnet_head", {}, ["model.pretrained=null"])
    assert head.data.resolution == 512 and head.optim.grad_clip == 1.0 and head.engine.micro_batch == 1
    assert head.data.prompt.startswith("a photo of standard maternal fetal ultrasound") and not head.caches_latents


@pytest.mark.parametrize("fields, fix", [
    ({"cache_latents": True, "data": {"dataset": "d", "augment": {"enabled": True}}}, "set cache_latents=null"),
    ({"controlnet": {"conditioning_channels": [16, 32, 96]}}, r"give it 4 entries, e\.g\. \[16, 32, 96, 256\]"),
    ({"lora": "no/such/lora"}, "give the model/ folder of a train-lora run"),
    ({"lora": " "}, "lora is empty"),
    ({"data": {"dataset": "d", "resolution": 60}}, "multiple of 8"),
    ({"data": {"dataset": "d", "augment": {"enabled": True, "shift": 0.7}}}, "shift < 0.5"),
    ({"data": {"dataset": "d", "prompt": "  "}}, "data.prompt is empty"),
    ({"eval_examples": -1}, "eval_examples must be 0"),
])
def test_a_wrong_setting_names_its_fix(fields, fix):
    with pytest.raises(ConfigError, match=fix):
        config(**fields)


def test_lora_may_be_a_folder_or_a_remote_uri(tmp_path):
    assert config(lora=str(tmp_path)).lora == str(tmp_path)
    assert config(lora="models:/sonosynth-lora@champion").lora.startswith("models:/")
    assert config(lora="s3://bucket/lora/model").lora.startswith("s3://")
