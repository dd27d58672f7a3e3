"""Planning, seeds and the shard task of generate, with a stand-in sampler (no model)."""

import threading

import numpy as np
import pytest

from sonosynth.datasets.geometry import Ellipse
from sonosynth.datasets.reader import DatasetReader
from sonosynth.infra.config import build
from sonosynth.infra.storage import LocalStorage
from sonosynth.launch.generate import GenerateConfig, sample_seed, plan_job
from sonosynth.launch.generate_worker import ATTEMPTS_EXHAUSTED, SamplerWorker


def cfg(tmp_path, **kw):
    return build(GenerateConfig, {"out": str(tmp_path / "out"), "num_samples": 10, "shard_size": 4, **kw})


def test_plan_covers_every_index_once_with_a_stable_run_id(tmp_path):
    plan = plan_job(cfg(tmp_path), {"mode": "joint", "prompts": ["head"]}, "abc")
    assert [i for t in plan.tasks for i in t["indices"]] == list(range(10))
    assert [len(t["indices"]) for t in plan.tasks] == [4, 4, 2]
    again = plan_job(cfg(tmp_path), {"mode": "joint", "prompts": ["head"]}, "abc")
    assert again.run_id == plan.run_id and again.tasks == plan.tasks
    assert plan_job(cfg(tmp_path, seed=1), {"mode": "joint"}, "abc").run_id != plan.run_id
    assert plan_job(cfg(tmp_path), {"mode": "joint", "prompts": ["head"]}, "other-lora").run_id != plan.run_id
    assert plan.spec(cfg(tmp_path), 3, 0).prompt == "head"


def test_class_mode_takes_planes_in_turn(tmp_path):
    lineage = {"mode": "class", "class_prompts": {"brain": "a photo of fetal brain", "femur": "a photo of fetal femur"}}
    plan = plan_job(cfg(tmp_path), lineage, None)
    c = cfg(tmp_path)
    assert [plan.spec(c, i, 0).plane for i in range(4)] == ["brain", "femur", "brain", "femur"]
    assert plan.spec(c, 1, 0).prompt == "a photo of fetal femur"
    with pytest.raises(ValueError, match="class mode needs planes"):
        plan_job(cfg(tmp_path, mode="class"), {}, None)


def test_derived_seeds_are_distinct():
    seeds = {sample_seed(0, i, a) for i in range(100) for a in range(4)}
    assert len(seeds) == 400


class StandInSampler:
    """Draws an empty mask on attempt 0 and a good head on later attempts."""

    resolution = 64

    def __init__(self):
        self.calls = 0

    def __call__(self, specs):
        self.calls += 1
        good = Ellipse(32, 32, 14, 10, 0.3).inside((64, 64))
        out = []
        for s in specs:
            rgb = np.full((64, 64, 3), 90, np.uint8)
            rgb[..., 2] = np.where(good, 230, 10) if s.attempt >= 1 else 10
            out.append(rgb)
        return out


def worker(tmp_path, **kw) -> SamplerWorker:
    c = cfg(tmp_path, **kw)
    w = SamplerWorker.__new__(SamplerWorker)
    w.cfg, w.plan, w.sampler = c, plan_job(c, {"mode": "joint", "prompts": ["head"]}, "x"), StandInSampler()
    w.storage, w.device_lock, w.lineage = LocalStorage(c.out), threading.Lock(), {"generation_run": "t"}
    return w


def test_rejected_samples_are_redrawn_with_the_next_seed(tmp_path):
    w = worker(tmp_path)
    accepted, rejected, images = w._sample([0, 1, 2])
    assert sorted(accepted) == [0, 1, 2] and images == 6
    assert {r["reason"] for r in rejected} == {"empty_mask"}
    assert all(s.meta["attempt"] == 1 and s.meta["seed"] == sample_seed(0, i, 1) for i, s in accepted.items())
    assert all(s.mask is not None and s.mask.max() == 255 for s in accepted.values())


def test_attempts_run_out(tmp_path):
    accepted, rejected, _ = worker(tmp_path, max_attempts=1)._sample([0, 1])
    assert accepted == {} and [r["reason"] for r in rejected].count(ATTEMPTS_EXHAUSTED) == 2


def test_a_shard_task_is_idempotent(tmp_path):
    w = worker(tmp_path)
    task = w.plan.tasks[0]
    first = w.run_shard(task)
    tar = tmp_path / "out" / first["record"]["shard"]
    before = tar.read_bytes()
    again = w.run_shard(task)
    assert again["reused"] and again["record"] == first["record"] and tar.read_bytes() == before
    from sonosynth.datasets.manifest import write_manifest

    write_manifest(w.storage, first["record"]["rows"])
    keys = [s.key for s in DatasetReader(str(tmp_path / "out"), distributed=False).samples()]
    assert keys == [f"syn-{w.plan.run_id}-{i:08d}" for i in range(4)]
