from typing import ClassVar

import pytest

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.config import EngineConfig, TrainStageConfig, ds_config, job_fingerprint
from sonosynth.trainers.diffusion.train import LoraTrainConfig
from sonosynth.trainers.optim import OptimConfig


def lora_cfg(**engine):
    return build(LoraTrainConfig, {"out": "o", "data": {"dataset": "x"}, "engine": {"max_steps": 10, **engine}})


def test_steps_or_epochs_exactly_one():
    with pytest.raises(ConfigError, match="exactly one of engine.max_steps or engine.epochs"):
        build(EngineConfig, {"max_steps": 5, "epochs": 2})
    assert EngineConfig(epochs=100, workers=2).total_steps(24) == 1200
    assert EngineConfig(epochs=1, workers=2, micro_batch=2, grad_accum=2).total_steps(10) == 2


def test_deepspeed_config_follows_the_engine():
    cpu = ds_config(EngineConfig(max_steps=1, grad_accum=4), OptimConfig(grad_clip=1.0), 2, False, False)
    assert cpu["train_batch_size"] == 8 and cpu["zero_optimization"]["stage"] == 2
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"] and cpu["gradient_clipping"] == 1.0
    gpu = ds_config(EngineConfig(max_steps=1), OptimConfig(grad_clip=None), 8, True, True)
    assert gpu["bf16"]["enabled"] and "gradient_clipping" not in gpu
    old_gpu = ds_config(EngineConfig(max_steps=1), OptimConfig(), 8, True, False)
    assert old_gpu["fp16"]["enabled"]


def test_evaluation_schedule():
    at_checkpoints = EngineConfig(max_steps=30, checkpoint_every=10)
    assert [d for d in range(1, 31) if at_checkpoints.evaluates_at(d, 30)] == [10, 20, 30]
    every_4 = EngineConfig(max_steps=10, checkpoint_every=10, eval_every=4)
    assert [d for d in range(1, 11) if every_4.evaluates_at(d, 10)] == [4, 8, 10]


@pytest.mark.parametrize("bad, message", [
    ({"eval_every": 0}, "eval_every must be at least 1, or null"),
    ({"best_mode": "up"}, "best_mode"),
    ({"best_metric": " "}, "name an evaluation metric"),
    ({"loader_workers": -1}, "loader_workers must be 0"),
    ({"prefetch": 0}, "prefetch must be at least 1"),
])
def test_bad_engine_values_name_the_fix(bad, message):
    with pytest.raises(ConfigError, match=message):
        build(EngineConfig, {"max_steps": 5, **bad})


def test_a_stage_config_must_name_a_registered_task():
    class Nope(TrainStageConfig):
        task: ClassVar[str] = "nope"

    with pytest.raises(ConfigError, match=r"no training task is registered as 'nope' \(registered: .*lora"):
        build(Nope, {"out": "o"})

    class Nameless(TrainStageConfig):
        pass

    with pytest.raises(ConfigError, match="names no task"):
        build(Nameless, {"out": "o"})
    assert LoraTrainConfig.task == "lora" and LoraTrainConfig.stage_name() == "train-lora"


def test_identity_leaves_out_what_a_resume_may_change():
    a, b = lora_cfg(), lora_cfg(max_steps=50, log_every=3, loader_workers=2, prefetch=4)
    assert a.job_identity() == b.job_identity()
    assert job_fingerprint(a) != job_fingerprint(b)  # a longer job is not the finished one
    assert lora_cfg(best_metric="eval/loss").job_identity() != a.job_identity()


class Defaults(TrainStageConfig):
    task: ClassVar[str] = "lora"
    engine_defaults: ClassVar[dict] = {"epochs": 20, "micro_batch": 5, "best_metric": "val/dice"}


@pytest.mark.parametrize("given, want", [
    (None, {"epochs": 20, "max_steps": None, "micro_batch": 5, "best_metric": "val/dice"}),
    ({"workers": 1}, {"epochs": 20, "micro_batch": 5, "workers": 1}),
    ({"max_steps": 3}, {"epochs": None, "max_steps": 3, "micro_batch": 5}),  # the recipe's length, not the stage's
    ({"epochs": 2, "max_steps": None}, {"epochs": 2, "max_steps": None}),
    ({"max_steps": None, "epochs": None}, {"epochs": 20, "max_steps": None}),
    ({"micro_batch": 2, "best_metric": None}, {"micro_batch": 2, "best_metric": None}),  # the recipe's own win
    (EngineConfig(max_steps=7, grad_accum=2), {"max_steps": 7, "grad_accum": 2, "micro_batch": 5}),
])
def test_the_stage_engine_defaults_fill_what_the_engine_section_leaves_out(given, want):
    data = {"out": "o"} if given is None else {"out": "o", "engine": given}
    engine = build(Defaults, data).engine
    assert {k: getattr(engine, k) for k in want} == want


def test_a_stage_without_engine_defaults_of_its_own_has_the_bases():
    assert build(LoraTrainConfig, {"out": "o", "data": {"dataset": "x"}}).engine.max_steps == 100
    cfg = build(LoraTrainConfig, {"out": "o", "data": {"dataset": "x"}, "engine": {"workers": 1}})
    assert (cfg.engine.max_steps, cfg.engine.micro_batch) == (100, 1)
    assert build(LoraTrainConfig, cfg.to_dict()) == cfg  # the resolved config.yaml builds the same config
