import json

import pytest

from sonosynth.infra.config import ConfigError, build
from sonosynth.infra.stage import StageFailed
from sonosynth.infra.storage import LocalStorage
from sonosynth.trainers.config import job_fingerprint
from sonosynth.trainers.diffusion.train import LoraTrainConfig
from sonosynth.trainers.launcher import TrainingError, train


def lora_cfg(tmp_path, **engine):
    return build(LoraTrainConfig, {"out": str(tmp_path / "out"), "data": {"dataset": "x"},
                                   "engine": {"max_steps": 10, **engine}})


class Joined(Exception):
    pass


@pytest.fixture
def no_ray(monkeypatch):
    """Stops train() where it would join Ray: what happened before is what the test checks."""
    import sonosynth.infra.cluster as cluster

    def connect(_cfg, *args, **kwargs):
        raise Joined()

    monkeypatch.setattr(cluster, "connect", connect)


def test_output_refuses_a_different_job_but_allows_longer_training(tmp_path, no_ray):
    with pytest.raises(Joined):
        train(lora_cfg(tmp_path))
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / "job.json").is_file()
    with pytest.raises(Joined):
        train(lora_cfg(tmp_path, max_steps=50, log_every=3))
    with pytest.raises(ConfigError, match=r"different train-lora job \(engine.seed"):
        train(lora_cfg(tmp_path, seed=3))


def test_a_finished_job_returns_its_summary_without_ray(tmp_path, no_ray):
    cfg = lora_cfg(tmp_path)
    with pytest.raises(Joined):
        train(cfg)
    LocalStorage(tmp_path / "out").put_text("summary.json", json.dumps({"job": job_fingerprint(cfg), "steps": 10}))
    assert train(cfg) == {"job": job_fingerprint(cfg), "steps": 10, "already_complete": True}
    with pytest.raises(Joined):  # the same job trained longer is not finished
        train(lora_cfg(tmp_path, max_steps=20))


def test_a_failed_job_is_a_stage_failure():
    assert issubclass(TrainingError, StageFailed)
