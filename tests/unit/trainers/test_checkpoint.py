import pytest
import torch

from sonosynth.infra.storage import LocalStorage
from sonosynth.trainers.checkpoint import CheckpointError, CheckpointStore, trainable_state


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


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    m[0].requires_grad_(False)
    return m


def test_trainable_state_leaves_out_frozen_weights_and_keeps_buffers():
    keys = set(trainable_state(net()))
    assert "0.weight" not in keys and {"1.weight", "1.running_mean", "2.weight"} <= keys


def test_best_weights_round_trip_and_pruning(tmp_path):
    storage = LocalStorage(tmp_path)
    store = CheckpointStore(storage)
    a, b = net(), net()
    with torch.no_grad():
        a[2].weight.add_(1.0)
        a[1].running_mean.add_(2.0)
    store.save_best(a, 5)
    store.save_best(b, 15)
    storage.put_text("checkpoints/step-00000010/_COMPLETE.json",
                     '{"step": 10, "tag": "step-00000010", "world_size": 1, "files": [], '
                     '"state": {"best": {"step": 5, "value": 1.0}}}')
    assert store.best_steps_in_use() == {5}
    store.prune_best({15} | store.best_steps_in_use())
    assert sorted(storage.list("best/")) == ["best/step-00000005.pt", "best/step-00000015.pt"]
    store.load_best(b, 5)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    store.prune_best({5})
    with pytest.raises(CheckpointError, match="best_metric=null"):
        store.load_best(b, 15)
