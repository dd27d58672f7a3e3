"""Base models in the formats users have on disk, loaded through ``model.pretrained=PATH``.

A tiny Stable Diffusion is saved as a real diffusers folder (``save_pretrained``: model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/) and loaded the way a recipe does; broken and
foreign folders fail when the config is built, naming the path and the fix; and a LoRA written by
sonosynth loads into a plain diffusers pipeline and draws the image sonosynth's sampler draws.
"""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.diffusion.lora import WEIGHTS_NAME, LoraConfig, add_lora, lora_parameters, save_lora
from sonosynth.trainers.diffusion.models import (DiffusionModelConfig, ModelFormatError, TinyDiffusionConfig,
                                                 build_components, build_pipeline, build_pretrained, build_tiny)
from sonosynth.trainers.diffusion.sampler import SampleSpec, Sampler, SamplerConfig, resolve_lora
from sonosynth.trainers.precision import choose_precision, resolve_precision

FIX = "point model.pretrained at a local copy of stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """The tiny model saved exactly as users save Stable Diffusion: ``pipe.save_pretrained``."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_pipeline(DiffusionModelConfig()).save_pretrained(folder)
    return folder


@pytest.fixture
def copy_of(sd_folder, tmp_path):
    dest = tmp_path / "sd"
    shutil.copytree(sd_folder, dest)
    return dest


def config_error(pretrained) -> str:
    with pytest.raises(ConfigError) as err:
        build(DiffusionModelConfig, {"pretrained": str(pretrained)})
    return str(err.value)


def test_a_diffusers_folder_loads_through_model_pretrained(sd_folder):
    assert sorted(p.name for p in sd_folder.iterdir()) == \
        ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    saved = build_tiny(TinyDiffusionConfig())
    loaded = build_components(build(DiffusionModelConfig, {"pretrained": str(sd_folder)}))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(saved, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not any(p.requires_grad for p in getattr(loaded, name).parameters())
    # the byte-level tokenizer round-trips: same ids for any prompt, padding and specials included
    for prompt in ("", "fetal héad, transthalamic plane", "x" * 200):
        kw = {"padding": "max_length", "max_length": 77, "truncation": True}
        assert loaded.tokenizer(prompt, **kw).input_ids == saved.tokenizer(prompt, **kw).input_ids
    assert type(loaded.noise_scheduler) is type(saved.noise_scheduler)
    for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "steps_offset"):
        assert loaded.noise_scheduler.config[key] == saved.noise_scheduler.config[key]


def test_a_missing_path_names_the_path_and_the_fix(tmp_path):
    msg = config_error(tmp_path / "sd15")
    assert f"{tmp_path / 'sd15'} does not exist" in msg and FIX in msg
    # the stage configs carry the same check, so the CLI fails before Ray or any worker starts
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "sd15"))):
        build(SamplerConfig, {"model": {"pretrained": str(tmp_path / "sd15")}})


def test_a_folder_missing_a_component_names_it(copy_of):
    shutil.rmtree(copy_of / "vae")
    (copy_of / "scheduler" / "scheduler_config.json").unlink()
    msg = config_error(copy_of)
    assert str(copy_of) in msg and "missing vae/, scheduler/scheduler_config.json" in msg
    assert "copy the missing parts from the model it came from" in msg


def test_a_component_without_weights_is_refused(copy_of):
    weights = copy_of / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    msg = config_error(copy_of)
    assert "missing unet/diffusion_pytorch_model.safetensors (or .bin)" in msg
    assert "found only diffusion_pytorch_model.fp16.safetensors" in msg


def test_an_empty_or_foreign_folder_says_what_it_is(sd_folder, tmp_path):
    msg = config_error(tmp_path)
    assert f"{tmp_path} is not a diffusers Stable Diffusion folder" in msg and FIX in msg
    # a component folder instead of the whole model
    assert f"set model.pretrained={sd_folder}" in config_error(sd_folder / "unet")
    # a lone model folder (a config.json, no model_index.json)
    shutil.copytree(sd_folder / "text_encoder", tmp_path / "clip")
    assert "holds a single CLIPTextModel" in config_error(tmp_path / "clip")
    # the Hugging Face cache entry rather than its snapshot
    snapshot = tmp_path / "models--sd15" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    assert f"set model.pretrained={snapshot}" in config_error(tmp_path / "models--sd15")


def test_single_file_checkpoints_are_refused_with_the_conversion(tmp_path):
    """A single-file SD checkpoint would need the hub (diffusers fetches its configs) or an original
    config yaml to load, so sonosynth refuses it and names the one-time conversion instead."""
    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 4, 3, 3)}, ckpt)
    msg = config_error(ckpt)
    assert f"{ckpt} is a single-file Stable Diffusion checkpoint (original single-file layout)" in msg
    assert f"P.from_single_file('{ckpt}').save_pretrained('{tmp_path / 'v1-5-pruned-emaonly'}')" in msg
    assert "convert_original_stable_diffusion_to_diffusers.py" in msg
    assert f"then set model.pretrained={tmp_path / 'v1-5-pruned-emaonly'}" in msg

    (tmp_path / "model.ckpt").write_bytes(b"not unpickled")
    assert "is a single-file checkpoint" in config_error(tmp_path / "model.ckpt")
    xl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, xl)
    assert "Stable Diffusion XL checkpoint; sonosynth trains and samples Stable Diffusion 1.x/2.x" in config_error(xl)
    lora = tmp_path / "lora" / WEIGHTS_NAME
    lora.parent.mkdir()
    save_file({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 2)}, lora)
    assert "is a LoRA, not a base model" in config_error(lora)
    assert f"{lora.parent} has no model_index.json, and {lora} is a LoRA" in config_error(lora.parent)


def test_an_sdxl_folder_is_refused(copy_of):
    index = json.loads((copy_of / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLPipeline", tokenizer_2=["transformers", "CLIPTokenizer"],
                 text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    (copy_of / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(copy_of / "text_encoder", copy_of / "text_encoder_2")
    msg = config_error(copy_of)
    assert f"{copy_of} is a Stable Diffusion XL folder (StableDiffusionXLPipeline" in msg
    assert "Stable Diffusion 1.x/2.x" in msg and FIX in msg

    index["_class_name"], _ = "FluxPipeline", index.pop("text_encoder_2")
    (copy_of / "model_index.json").write_text(json.dumps(index))
    assert f"{copy_of} is a FluxPipeline folder" in config_error(copy_of)
    del index["_class_name"]
    (copy_of / "model_index.json").write_text(json.dumps(index))
    assert f"{copy_of / 'model_index.json'} names no _class_name" in config_error(copy_of)


def test_components_of_different_models_are_refused(copy_of):
    other = build_tiny(TinyDiffusionConfig(text_hidden=48))
    shutil.rmtree(copy_of / "text_encoder")
    other.text_encoder.save_pretrained(copy_of / "text_encoder")
    msg = config_error(copy_of)
    assert f"{copy_of} mixes components of different models" in msg
    assert "unet/ cross-attends to 32-wide text embeddings (cross_attention_dim)" in msg
    assert "text_encoder/ makes 48-wide ones" in msg and FIX in msg


def test_weights_that_do_not_fit_their_config_fail_at_load_naming_the_folder(copy_of):
    # another model's UNet weights under this model's config: passes the file check, not the load
    other = build_tiny(TinyDiffusionConfig(unet_channels=[16, 32]))
    other.unet.save_pretrained(copy_of / "tmp-unet")
    shutil.copy(copy_of / "tmp-unet" / "diffusion_pytorch_model.safetensors", copy_of / "unet")
    build(DiffusionModelConfig, {"pretrained": str(copy_of)})
    with pytest.raises(ModelFormatError) as err:
        build_pretrained(copy_of)
    assert f"cannot load {copy_of / 'unet'}" in str(err.value) and "expected shape" in str(err.value)
    assert "copy unet/ whole from the model it came from" in str(err.value)

    # a config asking for more than the weights hold would load half-random: refused instead
    build_tiny(TinyDiffusionConfig()).unet.save_pretrained(copy_of / "unet")  # the right UNet back
    config = json.loads((copy_of / "text_encoder" / "config.json").read_text())
    (copy_of / "text_encoder" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelFormatError, match=re.escape(f"{copy_of / 'text_encoder'} has no weights for 16 tensors")):
        build_pretrained(copy_of)


def test_precision_auto_is_one_rule():
    assert resolve_precision("auto", "cpu") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    assert [choose_precision("auto", gpu, bf16) for gpu, bf16 in ((True, True), (True, False), (False, True))] == \
        ["bf16", "fp16", "fp32"]
    assert choose_precision("fp16", False, False) == "fp16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, fp16, bf16"):
        choose_precision("half", True, True)


def random_lora(folder, lora: LoraConfig, std: float, seed: int = 1):
    """A LoRA made by sonosynth's own add_lora + save_lora, with nonzero random weights so it matters."""
    parts = build_components(DiffusionModelConfig())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(parts.unet, parts.text_encoder, lora)
        with torch.no_grad():
            for p in lora_parameters(parts.unet) + lora_parameters(parts.text_encoder):
                p.copy_(torch.randn_like(p) * std)
    return save_lora(folder, parts.unet, parts.text_encoder, lora)


UINT8_TOLERANCE = 2
"""Max |difference| in uint8 levels between vanilla diffusers and sonosynth's sampler. Measured: 1
(one rounding flip; the float images differ by ~1.5e-6): the sampler fuses the LoRA into the weights,
diffusers keeps it as a side branch, which only reorders fp32 sums."""


def test_the_exported_lora_draws_the_same_image_in_plain_diffusers(sd_folder, tmp_path):
    # alpha != rank and a text-encoder LoRA (FU-LoRA): the scaling must travel in the file's metadata
    weights = random_lora(tmp_path / "lora", LoraConfig(rank=4, alpha=8, text_encoder=True), std=0.15)
    prompt, seed, steps, size = "fetal head, transthalamic plane", 7, 4, 64

    # sonosynth: the LoRA fetched and hashed once (as the generation driver does), handed to the sampler
    lora_dir, sha = resolve_lora(str(weights.parent))
    assert sha == hashlib.sha256(weights.read_bytes()).hexdigest()
    cfg = SamplerConfig(model={"pretrained": str(sd_folder), "clip_skip": 1}, lora=str(lora_dir), lora_scale=1.0,
                        scheduler="dpm++", steps=steps, guidance=7.5, resolution=size, batch_size=1)
    sampler = Sampler(cfg, device="cpu", lora_dir=lora_dir, lora_sha256=sha)
    assert sampler.lora_identity()["lora_sha256"] == sha
    ours = sampler([SampleSpec(index=0, attempt=0, seed=seed, prompt=prompt)])[0]

    # plain diffusers, no sonosynth code: the folder, the LoRA, the same scheduler, seed and prompt
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)

    def draw():
        image = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)

    def diff(a, b):
        return np.abs(a.astype(int) - b.astype(int))

    without = draw()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    vanilla = draw()
    assert ours.shape == vanilla.shape == (size, size, 3)
    assert diff(vanilla, ours).max() <= UINT8_TOLERANCE
    # the LoRA matters far beyond the tolerance, so a LoRA that did not load would fail the test
    assert diff(without, ours).max() > 20 * UINT8_TOLERANCE and diff(without, ours).mean() > 2
