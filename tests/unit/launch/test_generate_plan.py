"""Planning, seeds and the shard task of generate, with a stand-in sampler (no model)."""

import threading

import numpy as np
import pytest

from sonosynth.datasets.geometry import Ellipse
from sonosynth.datasets.reader import DatasetReader
from sonosynth.infra.config import build
from sonosynth.infra.storage import LocalStorage
from sonosynth.launch.generate.config import GenerateConfig, sample_seed, plan_job
from sonosynth.launch.generate.worker import ATTEMPTS_EXHAUSTED, SamplerWorker


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


def test_class_mode_run_id_follows_the_order_of_the_planes(tmp_path):
    lineage = {"mode": "class", "class_prompts": {"brain": "a photo of fetal brain", "femur": "a photo of fetal femur"}}
    a = plan_job(cfg(tmp_path, planes=["brain", "femur"]), lineage, "x")
    b = plan_job(cfg(tmp_path, planes=["femur", "brain"]), lineage, "x")
    assert a.run_id != b.run_id  # same prompts, but index i gets another plane: other images, other keys
    assert plan_job(cfg(tmp_path, planes=["brain", "femur"]), lineage, "x").run_id == a.run_id
    # `plane` labels joint-mode samples only: it does not make another class-mode run
    assert plan_job(cfg(tmp_path, planes=["brain", "femur"], plane="brain"), lineage, "x").run_id == a.run_id
    joint = {"mode": "joint", "prompts": ["head"]}
    assert plan_job(cfg(tmp_path, plane="brain"), joint, "x").run_id != plan_job(cfg(tmp_path), joint, "x").run_id


def test_duplicate_planes_are_refused(tmp_path):
    from sonosynth.infra.config import ConfigError

    with pytest.raises(ConfigError, match=r"planes lists \['brain'\] more than once"):
        cfg(tmp_path, planes=["brain", "femur", "brain"])
    with pytest.raises(ConfigError, match="planes is empty"):
        cfg(tmp_path, planes=[])


def test_per_class_sets_the_count_and_keeps_classes_even(tmp_path, caplog):
    from sonosynth.infra.config import ConfigError

    lineage = {"mode": "class", "class_prompts": {"brain": "b", "femur": "f", "thorax": "t"}}
    # explicit planes: num_samples follows at once
    c = build(GenerateConfig, {"out": str(tmp_path / "o"), "shard_size": 4, "planes": ["brain", "femur"],
                               "per_class": 3})
    assert c.num_samples == 6
    plan = plan_job(c, lineage, None)
    planes = [plan.spec(c, i, 0).plane for t in plan.tasks for i in t["indices"]]
    assert sorted(planes) == ["brain"] * 3 + ["femur"] * 3
    # planes from the LoRA's lineage: the count is set when the plan knows them
    c = build(GenerateConfig, {"out": str(tmp_path / "o"), "shard_size": 4, "per_class": 2})
    plan = plan_job(c, lineage, None)
    assert c.num_samples == 6 and [i for t in plan.tasks for i in t["indices"]] == list(range(6))
    assert {p: [plan.spec(c, i, 0).plane for i in range(6)].count(p) for p in plan.planes} == {
        "brain": 2, "femur": 2, "thorax": 2}
    # both given: they must agree
    with pytest.raises(ConfigError, match=r"num_samples=5 but per_class=3 x 2 planes = 6"):
        build(GenerateConfig, {"out": "o", "planes": ["brain", "femur"], "per_class": 3, "num_samples": 5})
    assert build(GenerateConfig, {"out": "o", "planes": ["brain", "femur"], "per_class": 3,
                                  "num_samples": 6}).num_samples == 6
    with pytest.raises(ValueError, match=r"num_samples=10 but per_class=2 x 3 planes = 6"):
        plan_job(build(GenerateConfig, {"out": "o", "per_class": 2, "num_samples": 10}), lineage, None)
    with pytest.raises(ConfigError, match="per_class is for class mode"):
        build(GenerateConfig, {"out": "o", "mode": "joint", "per_class": 2})
    with pytest.raises(ValueError, match="per_class is for class mode"):
        plan_job(build(GenerateConfig, {"out": "o", "per_class": 2}), {"mode": "joint"}, None)
    # without per_class, a count that does not divide among the planes is pointed out
    import logging

    with caplog.at_level(logging.WARNING, logger="sonosynth.launch.generate.config"):
        plan_job(build(GenerateConfig, {"out": "o", "num_samples": 7}), lineage, None)
    assert "does not divide among 3 planes: {'brain': 3, 'femur': 2, 'thorax': 2}" in caplog.text
    # the resolved config written beside the output builds the same config again
    again = build(GenerateConfig, c.to_dict())
    assert again.num_samples == 6 and plan_job(again, lineage, None).run_id == plan.run_id


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
