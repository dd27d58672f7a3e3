"""Two pipelines with two MLflow stores in one process: each writes only to its own, and models
are fetched from the store the caller names (no process-wide MLflow URI is set or read)."""

from __future__ import annotations

import os

import pytest
import yaml

from sonosynth.infra.config import Config
from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.model_registry import Registry, fetch_model_folder
from sonosynth.infra.stage import Report
from sonosynth.infra.storage import open_storage
from sonosynth.infra.tracking import Tracker, TrackingConfig
from sonosynth.launch import stages
from sonosynth.launch.pipeline import resolve_pipeline, run


class ModelConfig(Config):
    out: str
    """Output."""
    value: int = 1
    """What the model file holds."""
    tracking: TrackingConfig = TrackingConfig()
    """Tracking."""


def train_toy(cfg: ModelConfig) -> Report:
    """Writes model/value.txt, logs it and registers it as toy-model (as the training stages do)."""
    storage = open_storage(cfg.out)
    storage.put_text("model/value.txt", str(cfg.value))
    tracker = Tracker(cfg.tracking, experiment="toy", offline_dir=offline_dir_for(cfg.out))
    tracker.start(tags={"sonosynth.stage": "toy-train"})
    tracker.log_artifact(f"{cfg.out}/model", "model")
    version = tracker.register("model", "toy-model")
    tracker.close()
    return Report(stage="toy-train", out=cfg.out, outputs={"model": f"{cfg.out}/model"},
                  tracking={"uri": tracker.uri, "run_id": tracker.run_id, "registered_model": "toy-model",
                            "version": version})


@pytest.fixture(autouse=True)
def toy_train(monkeypatch):
    monkeypatch.setitem(stages.STAGES, "toy-train", stages.Stage("toy-train", "t", lambda: (ModelConfig, train_toy)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def pipeline(tmp_path, name: str, value: int, uri: str | None):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / name), "tracking": {"uri": uri, "experiment": name},
                                    "stages": {"model": {"stage": "toy-train", "value": value}}}))
    return resolve_pipeline(str(path), {}, [])


def test_two_pipelines_in_one_process_keep_to_their_own_stores(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    uri_a = f"sqlite:///{tmp_path / 'a.db'}"
    before = mlflow.get_tracking_uri()
    first = run(pipeline(tmp_path, "a", 1, uri_a))
    second = run(pipeline(tmp_path, "b", 2, None))  # no uri: the default store, OUT/mlflow.db
    uri_b = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    assert first.tracking["uri"] == uri_a and second.tracking["uri"] == uri_b
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == before

    for uri, mine, other in ((uri_a, "a", "b"), (uri_b, "b", "a")):
        client = MlflowClient(uri)
        names = {e.name for e in client.search_experiments()}
        assert mine in names and other not in names, (uri, names)
        assert [str(v.version) for v in client.search_model_versions("name='toy-model'")] == ["1"]
    # the same models:/ URI is a different model in each store
    assert (fetch_model_folder("models:/toy-model/1", uri_a) / "value.txt").read_text() == "1"
    assert (fetch_model_folder("models:/toy-model/latest", uri_b) / "value.txt").read_text() == "2"
    registry = Registry(uri_b)
    registry.set_champion("toy-model", "1", reason="a test")
    assert (fetch_model_folder("models:/toy-model@champion", uri_b) / "value.txt").read_text() == "2"
    assert Registry(uri_a).alias("toy-model", "champion") is None
