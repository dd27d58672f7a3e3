import pytest

from sonosynth.infra.config import ConfigError, build
from sonosynth.infra.storage import LocalStorage
from sonosynth.trainers.checkpoint import CheckpointError, CheckpointStore
from sonosynth.trainers.engine import EngineConfig, check_output, ds_config
from sonosynth.trainers.optim import OptimConfig
from sonosynth.trainers.diffusion.train import LoraTrainConfig


def lora_cfg(tmp_path, **engine):
    return build(LoraTrainConfig, {"out": str(tmp_path / "out"), "data": {"dataset": "x"},
                                   "engine": {"max_steps": 10, **engine}})


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


def test_output_refuses_a_different_job_but_allows_longer_training(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    assert check_output(storage, lora_cfg(tmp_path)) is False
    assert check_output(storage, lora_cfg(tmp_path, max_steps=50, log_every=3)) is True
    with pytest.raises(ConfigError, match=r"different config \(engine.seed"):
        check_output(storage, lora_cfg(tmp_path, seed=3))


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path):
    storage = LocalStorage(tmp_path)
    for step in (10, 20, 30):
        storage.put_bytes(f"checkpoints/step-{step:08d}/mp_rank_00_model_states.pt", b"x")
        storage.put_text(f"checkpoints/step-{step:08d}/_COMPLETE.json",
                         f'{{"step": {step}, "tag": "step-{step:08d}", "world_size": 2, "files": []}}')
    storage.put_bytes("checkpoints/step-00000040/zero_pp_rank_0_mp_rank_00_optim_states.pt", b"half")
    store = CheckpointStore(storage, keep=2)
    assert store.latest()["step"] == 30
    store._prune(keep_step=30)
    left = {k.split("/")[1] for k in storage.list("checkpoints/")}
    assert left == {"step-00000020", "step-00000030"}
    assert not (tmp_path / "checkpoints" / "step-00000040").exists()


def test_resuming_with_another_world_size_names_the_fix(tmp_path):
    store = CheckpointStore(LocalStorage(tmp_path))
    with pytest.raises(CheckpointError, match="engine.workers=2"):
        store.load(None, {"tag": "step-00000010", "world_size": 2, "files": []}, world=4)
