"""The per-rank pieces of the engine, and the whole loop on one in-process rank."""

import importlib.util
import json
import os
import socket
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from sonosynth.infra.config import ConfigError
from sonosynth.trainers.batching import (SeededExamples, ShareBatches, StepBatches, example_indices, noise_seed,
                                         to_device)
from sonosynth.trainers.engine import JobState, broadcast_buffers, task_datasets
from sonosynth.trainers.metrics import TrainMeter, combine, evaluate, improves, split_output
from sonosynth.trainers.task import TrainTask, WorkerContext, encode_once

TOY = Path(__file__).resolve().parents[2] / "integration" / "toy_task.py"


def order(n, world, micro_batch, grad_accum, steps, rank, seed=0):
    return [i for step in range(steps) for micro in range(grad_accum)
            for i in example_indices(n, seed, step=step, micro=micro, rank=rank, world=world,
                                     micro_batch=micro_batch, grad_accum=grad_accum)]


def test_each_epoch_visits_every_example_once_across_ranks():
    n, world, mb, ga = 12, 2, 2, 3  # global batch 12 = one epoch per step
    for step in range(3):
        seen = [i for rank in range(world) for micro in range(ga)
                for i in example_indices(n, 7, step=step, micro=micro, rank=rank, world=world,
                                         micro_batch=mb, grad_accum=ga)]
        assert sorted(seen) == list(range(n))


def test_order_is_a_pure_function_of_seed_and_step():
    assert order(10, 2, 1, 1, 20, 0) == order(10, 2, 1, 1, 20, 0)
    assert order(10, 2, 1, 1, 20, 0) != order(10, 2, 1, 1, 20, 0, seed=1)
    later = [example_indices(10, 0, step=s, micro=0, rank=1, world=2, micro_batch=1, grad_accum=1)[0]
             for s in range(5, 20)]
    assert later == order(10, 2, 1, 1, 20, 1)[5:]


def test_epochs_are_reshuffled():
    first, second = order(8, 1, 8, 1, 2, 0)[:8], order(8, 1, 8, 1, 2, 0)[8:]
    assert sorted(first) == sorted(second) == list(range(8)) and first != second


def test_noise_seeds_differ_per_rank_step_and_micro():
    seeds = {noise_seed(0, s, m, r) for s in range(10) for m in range(2) for r in range(2)}
    assert len(seeds) == 40


def test_a_resumed_sampler_yields_the_rest_of_the_uninterrupted_one():
    kw = dict(rank=1, world=2, micro_batch=3, grad_accum=2)
    full = list(StepBatches(10, 4, start=0, total=8, **kw))
    assert len(full) == 16 and list(StepBatches(10, 4, start=5, total=8, **kw)) == full[10:]
    assert [i for i, _ in full[0]] == example_indices(10, 4, step=0, micro=0, **kw)
    assert len({seed for batch in full for _, seed in batch}) == 48  # one seed per example drawn


def test_evaluation_shares_cover_the_set_once():
    keys = [k for rank in range(3) for batch in ShareBatches(10, 0, rank=rank, world=3, batch=2) for k in batch]
    assert sorted(i for i, _ in keys) == list(range(10))
    assert list(ShareBatches(10, 0, rank=1, world=3, batch=2)) == list(ShareBatches(10, 0, rank=1, world=3, batch=2))


class Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(2) + i


def test_examples_are_augmented_from_their_seed():
    data = SeededExamples(Noisy())
    assert torch.equal(data[(1, 7)], data[(1, 7)]) and not torch.equal(data[(1, 7)], data[(1, 8)])


def test_batches_move_to_the_device_in_any_nesting():
    Pair = namedtuple("Pair", "a b")
    moved = to_device({"x": torch.zeros(1), "y": [torch.ones(1), (2, "s")], "p": Pair(torch.zeros(1), 3)},
                      torch.device("meta"))
    assert moved["x"].is_meta and moved["y"][0].is_meta and moved["y"][1] == (2, "s")
    assert isinstance(moved["p"], Pair) and moved["p"].a.is_meta and moved["p"].b == 3


def test_forward_may_return_the_loss_or_loss_and_metrics():
    loss = torch.tensor(1.0)
    assert split_output(loss) == (loss, {})
    assert split_output((loss, {"acc": 0.5}))[1] == {"acc": 0.5}
    with pytest.raises(TypeError, match=r"the loss or \(loss"):
        split_output({"loss": loss})


def ctx1() -> WorkerContext:
    return WorkerContext(0, 1, 0, torch.device("cpu"), storage=None)


def test_train_metrics_are_averaged_over_micro_batches():
    meter = TrainMeter(torch.device("cpu"))
    meter.add(torch.tensor(1.0), {"acc": torch.tensor(0.5), "val/x": 2})
    meter.add(torch.tensor(3.0), {"acc": 1.0, "val/x": 4})
    assert meter.reduce(ctx1()) == {"train/loss": 2.0, "train/acc": 0.75, "val/x": 3.0}
    assert meter.reduce(ctx1()) == {}
    meter.add(torch.tensor(1.0), {"acc": 1.0, "val/x": 1})
    with pytest.raises(ValueError, match="same names"):
        meter.add(torch.tensor(1.0), {})


class Sums(TrainTask):
    def eval_step(self, module, batch):
        assert not module.training
        return {"val/mean": (batch.sum(), len(batch)), "val/count": len(batch)}


def test_evaluation_averages_sums_over_counts_and_sums_bare_values():
    module = torch.nn.Linear(1, 1).train()
    loader = [torch.tensor([1.0, 2.0]), torch.tensor([6.0])]
    assert evaluate(Sums(None, ctx1()), module, loader, ctx1()) == {"val/mean": 3.0, "val/count": 3.0}
    assert module.training


def test_every_ranks_share_is_combined_then_the_task_finalizes():
    shares = [{"val/mean": (3.0, 2.0), "val/n": (2.0, None), "val/none": (0.0, 0.0)},
              {},  # a rank whose share of the validation set is empty
              {"val/mean": (6.0, 1.0), "val/n": (1.0, None), "val/none": (0.0, 0.0)}]
    assert combine(shares) == {"val/mean": 3.0, "val/n": 3.0}  # a name whose counts add to 0 is left out

    class Ratio(Sums):
        def finalize_metrics(self, reduced):
            return {**reduced, "val/ratio": reduced["val/mean"] / reduced["val/count"]}

    module = torch.nn.Linear(1, 1)
    got = evaluate(Ratio(None, ctx1()), module, [torch.tensor([1.0, 2.0]), torch.tensor([6.0])], ctx1())
    assert got == {"val/mean": 3.0, "val/count": 3.0, "val/ratio": 1.0}


def test_encode_once_stacks_every_example_in_order():
    def load(i):
        return torch.full((2,), float(i))

    one = encode_once(ctx1(), 5, load, lambda x: x * 10, chunk=2)
    assert torch.equal(one, torch.arange(5.0)[:, None].expand(5, 2) * 10)
    mean, std = encode_once(ctx1(), 3, load, lambda x: (x, x + 1))
    assert mean.shape == (3, 2) and torch.equal(std[:, 0], torch.tensor([1.0, 2.0, 3.0]))


def test_encode_once_gathers_the_shares_of_every_rank():
    class TwoRanks(WorkerContext):
        """Rank 1 of 2; rank 0's share (the even examples) comes from a stand-in gather."""

        def all_gather(self, obj):
            return [{i: torch.full((2,), -float(i)) for i in range(0, 5, 2)}, obj]

    got = encode_once(TwoRanks(1, 2, 0, torch.device("cpu"), None), 5, lambda i: torch.full((2,), float(i)),
                      lambda x: x)
    assert got[:, 0].tolist() == [0.0, 1.0, -2.0, 3.0, -4.0]  # odd examples encoded here, even ones by rank 0


def test_buffer_broadcast_is_a_no_op_on_one_process():
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean += 1
    broadcast_buffers(bn)
    assert torch.equal(bn.running_mean, torch.ones(3))


def test_job_state_round_trips_through_a_checkpoint_record():
    state = JobState(resumed_from_step=4, eval_last={"val/acc": 0.5}, loss_first=1.0,
                     best={"metric": "val/acc", "mode": "max", "value": 0.5, "step": 4, "metrics": {"val/acc": 0.5}})
    record = json.loads(json.dumps(state.to_checkpoint()))  # what _COMPLETE.json holds
    assert JobState.from_checkpoint(record) == state
    assert JobState.from_checkpoint({}) == JobState()  # a checkpoint without state, e.g. from an older job


class Sized(TrainTask):
    def __init__(self, cfg, ctx, n_train=3, n_eval=0):
        super().__init__(cfg, ctx)
        self.n_train, self.n_eval = n_train, n_eval

    def train_dataset(self):
        return list(range(self.n_train))

    def eval_dataset(self):
        return list(range(self.n_eval))


def test_an_empty_validation_set_is_no_evaluation_and_refused_while_best_metric_needs_one():
    from types import SimpleNamespace

    def cfg(best_metric):
        return SimpleNamespace(task="toy", engine=SimpleNamespace(best_metric=best_metric))

    assert task_datasets(cfg(None), Sized(None, ctx1()))[1] is None
    assert len(task_datasets(cfg("val/acc"), Sized(None, ctx1(), n_eval=2))[1]) == 2
    with pytest.raises(ConfigError, match=r"best_metric=val/acc chooses .*'toy' task's is empty.*best_metric=null"):
        task_datasets(cfg("val/acc"), Sized(None, ctx1()))
    with pytest.raises(ValueError, match="no training examples"):
        task_datasets(cfg(None), Sized(None, ctx1(), n_train=0))


def test_best_is_strictly_better_in_its_mode():
    assert improves(0.5, None, "max") and not improves(float("nan"), None, "max")
    assert improves(0.6, {"value": 0.5}, "max") and not improves(0.5, {"value": 0.5}, "max")
    assert improves(0.4, {"value": 0.5}, "min") and not improves(0.6, {"value": 0.5}, "min")


# -- the whole loop on one rank, without Ray ------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("toy_task_unit", TOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group, as Ray Train would set up."""
    import torch.distributed as dist

    saved = dict(os.environ)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def train_toy(toy, out: Path, **engine):
    from sonosynth.infra.config import build
    from sonosynth.infra.storage import LocalStorage
    from sonosynth.trainers.engine import run

    cfg = build(toy.ToyConfig, {"out": str(out), "tracking": {"enabled": False}, "optim": {"lr": 0.01},
                                "engine": {"workers": 1, "micro_batch": 4, "log_every": 5, "checkpoint_every": 10,
                                           "progress": False, **engine}})
    run(cfg, toy.ToyTask, WorkerContext(0, 1, 0, torch.device("cpu"), LocalStorage(out)))
    return json.loads((out / "summary.json").read_text())


def test_one_rank_trains_exports_the_best_and_resumes_exactly(toy, one_rank, tmp_path):
    ref = train_toy(toy, tmp_path / "ref", max_steps=30, eval_every=5, best_metric="val/loss", best_mode="min")
    assert ref["best"]["metric"] == "val/loss" and ref["eval_start"]["val/loss"] > ref["best"]["value"]
    first = train_toy(toy, tmp_path / "b", max_steps=20, eval_every=5, best_metric="val/loss", best_mode="min")
    assert first["steps"] == 20
    (tmp_path / "b" / "summary.json").unlink()
    again = train_toy(toy, tmp_path / "b", max_steps=30, eval_every=5, best_metric="val/loss", best_mode="min")
    assert again["resumed_from_step"] == 20 and again["best"] == ref["best"]
    a = torch.load(tmp_path / "ref" / "model" / "weights.pt")
    b = torch.load(tmp_path / "b" / "model" / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_best_metric_must_be_an_evaluation_metric(toy, one_rank, tmp_path):
    with pytest.raises(ConfigError, match=r"best_metric=val/dice is not among .*\(val/acc, val/loss\)"):
        train_toy(toy, tmp_path / "o", max_steps=2, best_metric="val/dice")
