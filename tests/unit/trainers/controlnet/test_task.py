"""The controlnet task in-process (tiny model, CPU, no Ray): what the engine gets from it."""

import numpy as np
import pytest
import torch

from sonosynth.infra.config import build
from sonosynth.trainers.batching import SeededExamples
from sonosynth.trainers.controlnet.train import ControlNetTask, ControlNetTrainConfig, draw_for_masks
from sonosynth.trainers.diffusion.train import EVAL_DRAWS


@pytest.fixture(scope="module")
def task(tmp_path_factory, make_phantom_dataset) -> ControlNetTask:
    """A task over 4 phantom pairs at 32 px, with a random LoRA fused into the base model."""
    from sonosynth.infra.storage import LocalStorage
    from sonosynth.trainers.diffusion.lora import write_random_lora
    from sonosynth.trainers.diffusion.models import DiffusionModelConfig
    from sonosynth.trainers.task import WorkerContext

    tmp = tmp_path_factory.mktemp("controlnet-task")
    data = make_phantom_dataset(tmp / "d", 4, ["brain"], size=48)
    lora = write_random_lora(tmp / "lora", DiffusionModelConfig(), rank=4, resolution=32)
    cfg = build(ControlNetTrainConfig, {
        "out": str(tmp / "out"), "eval_examples": 2, "lora": str(lora),
        "data": {"dataset": str(data), "split": None, "resolution": 32},
        "controlnet": {"conditioning_channels": [8, 8, 16, 16]}})
    return ControlNetTask(cfg, WorkerContext(0, 1, 0, torch.device("cpu"), LocalStorage(tmp / "out")))


def test_one_step_gives_a_finite_loss_and_grads_for_the_controlnet_alone(task):
    batch = task.collate([SeededExamples(task.train_dataset())[(i, 0)] for i in (3, 0)])
    assert batch["condition"].shape == (2, 3, 32, 32) and set(batch["condition"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(batch["latent_mean"], task.latent_cache[0][[3, 0]])
    module = task.module()
    module.train()
    loss = module(batch, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    trained = {id(p) for group in task.param_groups(module) for p in group["params"]}
    assert trained == {id(p) for p in module.controlnet.parameters()}
    assert all(p.grad is not None for p in module.controlnet.parameters())
    # The zero convolutions are what receives gradient first: the residuals start at zero.
    zero_convs = [p for n, p in module.controlnet.named_parameters() if "zero_conv" in n or "mid_block" in n]
    assert any(p.grad.abs().sum() > 0 for p in zero_convs)
    frozen = [*task.parts.unet.parameters(), *task.parts.vae.parameters(), *task.parts.text_encoder.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


def test_controlnet_starts_from_the_unet_with_the_lora_fused_in(task):
    from sonosynth.trainers.diffusion.models import build_components

    base = build_components(task.cfg.model).unet
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused, copied = task.parts.unet.state_dict()[name], task.controlnet.state_dict()[name]
    assert torch.equal(copied, fused) and not torch.equal(fused, base.state_dict()[name])
    assert task.lora_sha256 and len(task.lora_sha256) == 64


def test_eval_loss_has_fixed_noise_per_example(task):
    module = task.module()
    module.eval()
    eval_set = task.eval_dataset()
    assert len(eval_set) == 2 and "latent_mean" in eval_set[1]
    batch = task.collate([eval_set[1]])
    with torch.no_grad():
        first, again = (task.eval_step(module, batch)["eval/loss"] for _ in range(2))
    assert first[1] == again[1] == EVAL_DRAWS  # (sum, count): the engine averages over every rank's share
    assert torch.isfinite(first[0]) and first[0].item() == again[0].item()


def test_preview_draws_one_image_per_mask(task):
    from sonosynth.trainers.controlnet.models import controlnet_pipeline

    masks = [task.pairs[0].mask, task.pairs[1].mask]
    pipe = controlnet_pipeline(task.parts, task.controlnet)
    preview = task.cfg.preview.model_copy(update={"steps": 2})
    images = draw_for_masks(pipe, masks, task.cfg.data.prompt, 1, preview)
    assert [im.shape for im in images] == [(32, 32, 3)] * 2 and images[0].dtype == np.uint8
    assert np.array_equal(images[0], draw_for_masks(pipe, masks, task.cfg.data.prompt, 1, preview)[0])
