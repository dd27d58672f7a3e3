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


def test_lora_task_feeds_the_engine_batches_and_a_fixed_noise_eval(tmp_path, make_phantom_dataset):
    from sonosynth.infra.storage import LocalStorage
    from sonosynth.trainers.diffusion.train import EVAL_DRAWS, LoraTask
    from sonosynth.trainers.batching import SeededExamples
    from sonosynth.trainers.task import WorkerContext

    data = make_phantom_dataset(tmp_path / "d", 6, ["brain"], size=48)
    ctx = WorkerContext(0, 1, 0, torch.device("cpu"), LocalStorage(tmp_path / "out"))
    cfg = build(LoraTrainConfig, {"out": str(tmp_path / "out"), "eval_examples": 3, "lora": {"rank": 4},
                                  "data": {"dataset": str(data), "split": None, "resolution": 32}})
    task = LoraTask(cfg, ctx)
    train_set, eval_set = task.train_dataset(), task.eval_dataset()
    assert len(train_set) == 6 and len(eval_set) == 3
    batch = task.collate([SeededExamples(train_set)[(i, 0)] for i in (4, 1)])
    assert batch["index"].tolist() == [4, 1]
    assert torch.equal(batch["latent_mean"], task.latent_cache[0][[4, 1]]) and "text_emb" in batch
    with torch.no_grad():  # the cache holds what the VAE makes of each example, in example order
        dist = task.parts.vae.encode(task.examples[4].pixels[None]).latent_dist
    torch.testing.assert_close(task.latent_cache[0][4], dist.mean[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(task.latent_cache[1][4], dist.std[0], rtol=1e-5, atol=1e-6)
    module = task.module()
    loss = module(batch, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss.item() > 0
    assert len(task.param_groups(module)) == 1

    module.eval()
    with torch.no_grad():
        whole = task.eval_step(module, task.collate([eval_set[i] for i in range(3)]))["eval/loss"]
        parts = [task.eval_step(module, task.collate([eval_set[i]]))["eval/loss"] for i in range(3)]
    assert whole[1] == 3 * EVAL_DRAWS  # (sum, count): the engine averages over every rank's share
    assert whole[0].item() == pytest.approx(sum(p[0].item() for p in parts), rel=1e-5)
