import json
import logging
import time

import pytest

from sonosynth.infra.local_s3 import _free_port
from sonosynth.infra.tracking import OFFLINE_FILE, Tracker, TrackingConfig, replay


def dead_uri() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # nothing listens there


def test_local_store_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig()
    assert cfg.resolved_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert cfg.artifact_location() == (tmp_path / "runs" / "mlartifacts").as_uri()


def test_disabled_tracker_touches_nothing(tmp_path):
    tracker = Tracker(TrackingConfig(uri=dead_uri()), enabled=False, offline_dir=tmp_path)
    assert tracker.start() is None
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_a_down_server_does_not_stop_training(tmp_path, caplog):
    cfg = TrackingConfig(uri=dead_uri(), request_timeout_s=1, request_retries=0)
    tracker = Tracker(cfg, offline_dir=tmp_path, experiment="t")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert tracker.start() is None
        for step in range(1, 4):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        (tmp_path / "a.txt").write_text("artifact")
        tracker.log_artifact(tmp_path / "a.txt", "files")
        assert tracker.register("model", "m") is None
        tracker.close()
    assert time.monotonic() - t0 < 30
    assert tracker.offline
    records = [json.loads(x) for x in (tmp_path / OFFLINE_FILE).read_text().splitlines()]
    assert [r["kind"] for r in records] == ["metrics"] * 3 + ["artifact", "end"]
    assert "training goes on" in caplog.text and "tracking-replay" in caplog.text


@pytest.mark.integration
def test_undelivered_records_replay_to_a_real_server(tmp_path, mlflow_url):
    cfg = TrackingConfig(uri=dead_uri(), request_timeout_s=1, request_retries=0)
    tracker = Tracker(cfg, offline_dir=tmp_path, experiment="replay-test")
    tracker.start()
    tracker.log_params({"lora.rank": 8})
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.log_text("hello", "notes/readme.txt")
    tracker.close()

    run_id = replay(tmp_path, TrackingConfig(uri=mlflow_url))  # the experiment comes from the records
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_url)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "replay-test"
    assert run.data.params["lora.rank"] == "8" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/readme.txt"]
    assert not (tmp_path / OFFLINE_FILE).exists()


@pytest.mark.integration
def test_tracker_comes_back_online_and_delivers_the_backlog(tmp_path, mlflow_url):
    cfg = TrackingConfig(uri=mlflow_url, reconnect_every_s=0)
    tracker = Tracker(cfg, offline_dir=tmp_path, experiment="reconnect-test")
    run_id = tracker.start()
    tracker._go_offline("test", ConnectionError("simulated outage"))
    tracker._last_attempt = time.monotonic() + 3600  # still "down" for the next call
    tracker._keep({"kind": "metrics", "values": {"x": 1.0}, "step": 1, "time": time.time()})
    tracker._last_attempt = 0.0
    tracker.log_metrics({"x": 2.0}, 2)  # due for a retry: the backlog goes first
    assert not tracker.offline
    tracker.close()
    from mlflow import MlflowClient

    hist = MlflowClient(mlflow_url).get_metric_history(run_id, "x")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 2.0)]


def test_a_run_nests_under_its_parent_with_the_configured_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(TrackingConfig(uri=uri), offline_dir=tmp_path / "p", experiment="nest")
    parent_id = parent.start()
    cfg = TrackingConfig(uri=uri, parent_run_id=parent_id, tags={"sonosynth.pipeline_section": "lora", "a": "1"})
    child = Tracker(cfg, offline_dir=tmp_path / "c", experiment="nest")
    child.start(tags={"a": "2", "sonosynth.stage": "train-lora"})  # the stage's tags win over the config's
    child.close()
    from mlflow import MlflowClient

    tags = MlflowClient(uri).get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent_id and tags["sonosynth.pipeline_section"] == "lora"
    assert tags["a"] == "2" and tags["sonosynth.stage"] == "train-lora"


def test_a_run_created_offline_is_replayed_with_its_tags_under_the_given_parent(tmp_path):
    cfg = TrackingConfig(uri=dead_uri(), request_timeout_s=1, request_retries=0, run_name="ingest",
                         tags={"sonosynth.pipeline_section": "real"})
    tracker = Tracker(cfg, offline_dir=tmp_path, experiment="offline-nest")
    assert tracker.start(tags={"sonosynth.stage": "ingest"}) is None
    tracker.log_metrics({"n": 3.0}, 0)
    tracker.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(TrackingConfig(uri=uri), offline_dir=tmp_path / "p", experiment="offline-nest")
    parent_id = parent.start()
    run_id = replay(tmp_path, TrackingConfig(uri=uri, parent_run_id=parent_id))
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "ingest" and run.data.metrics["n"] == 3.0
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.tags["sonosynth.pipeline_section"] == "real" and run.data.tags["sonosynth.stage"] == "ingest"
