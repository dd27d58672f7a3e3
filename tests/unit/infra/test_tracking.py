import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from sonosynth.infra.config import Config
from sonosynth.infra.local_s3 import _free_port
from sonosynth.infra.tracking import OFFLINE_FILE, Tracker, TrackingConfig
from sonosynth.infra.tracking_replay import replay, replay_folder
from sonosynth.launch.pipeline.config import DONE


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
    assert [r["kind"] for r in records] == ["run"] + ["metrics"] * 3 + ["artifact", "register", "end"]
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


def test_a_run_nests_under_its_parent_with_the_configured_tags(tmp_path, store):
    uri = store(tmp_path)
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


def test_a_run_created_offline_is_replayed_with_its_tags_under_the_given_parent(tmp_path, store):
    cfg = TrackingConfig(uri=dead_uri(), request_timeout_s=1, request_retries=0, run_name="ingest",
                         tags={"sonosynth.pipeline_section": "real"})
    tracker = Tracker(cfg, offline_dir=tmp_path, experiment="offline-nest")
    assert tracker.start(tags={"sonosynth.stage": "ingest"}) is None
    tracker.log_metrics({"n": 3.0}, 0)
    tracker.close()
    uri = store(tmp_path)
    parent = Tracker(TrackingConfig(uri=uri), offline_dir=tmp_path / "p", experiment="offline-nest")
    parent_id = parent.start()
    run_id = replay(tmp_path, TrackingConfig(uri=uri, parent_run_id=parent_id))
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "ingest" and run.data.metrics["n"] == 3.0
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.tags["sonosynth.pipeline_section"] == "real" and run.data.tags["sonosynth.stage"] == "ingest"


# -- a server lost mid-run, and the replay --------------------------------------------------------

SECRET = "s3cr3t-value-0123"


class Down:
    """An MlflowClient whose server has gone away: every call fails as a refused connection does."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"API request to http://gone/{name} failed with exception Max retries exceeded")

        return fail


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """One SQLite store with MLflow's tables made once (making them takes seconds); tests copy it."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store):
    """``store(tmp_path)``: a fresh SQLite store (a copy of the empty one) in that folder."""
    def make(folder: Path) -> str:
        shutil.copy(empty_store, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return make


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def lose_server(tracker: Tracker) -> None:
    tracker._client = Down()


def records(folder):
    return [json.loads(x) for x in (folder / OFFLINE_FILE).read_text().splitlines()]


def test_a_server_lost_mid_run_keeps_everything_and_the_replay_finishes_the_same_run(tmp_path, store, monkeypatch):
    monkeypatch.setenv("SONOSYNTH_TEST_TOKEN", SECRET)
    uri, off = store(tmp_path), tmp_path / "job" / "tracking-offline"
    parent = Tracker(TrackingConfig(uri=uri), offline_dir=tmp_path / "p", experiment="outage")
    parent_id = parent.start()
    tracker = Tracker(TrackingConfig(uri=uri, parent_run_id=parent_id, reconnect_every_s=3600),
                      offline_dir=off, experiment="outage")
    run_id = tracker.start(tags={"sonosynth.stage": "train-sam"})
    tracker.log_params({"lr": 0.1})
    tracker.log_metrics({"loss": 1.0}, 1)
    lose_server(tracker)
    tracker.log_metrics({"loss": 0.5}, 2)  # nothing raises: the tracker goes offline
    tracker.log_tags({"note": f"token {SECRET}"})
    tracker.log_text(f"password={SECRET}\n", "notes/config.txt")  # its temp file is gone when it returns
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\0" * 16)
    tracker.log_artifact(tmp_path / "model", "model")
    assert tracker.register("model", "outage-model", alias="candidate") is None
    tracker.close()
    assert tracker.offline and tracker.run_id == run_id
    kept = records(off)
    assert [r["kind"] for r in kept] == ["metrics", "tags", "artifact", "artifact", "register", "end"]
    assert {r["run_id"] for r in kept} == {run_id}
    assert SECRET not in (off / OFFLINE_FILE).read_text()
    [kept_text] = off.rglob("config.txt")  # the copy kept of the text artifact, redacted
    assert kept_text.read_text() == "password=***SONOSYNTH_TEST_TOKEN\n"

    done = replay_folder(off, TrackingConfig(uri=uri))
    assert done.runs == [run_id] and done.created == [] and done.records == 6
    assert done.registered == {"outage-model": "1"}
    c = client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.tags["note"] == "token ***SONOSYNTH_TEST_TOKEN" and run.data.params["lr"] == "0.1"
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    text = Path(c.download_artifacts(run_id, "notes/config.txt", str(tmp_path / "dl"))).read_text()
    assert text == "password=***SONOSYNTH_TEST_TOKEN\n"
    assert [a.path for a in c.list_artifacts(run_id, "model")] == ["model/weights.bin"]
    version = c.get_model_version_by_alias("outage-model", "candidate")
    assert str(version.version) == "1" and version.run_id == run_id
    assert not off.exists(), "a replayed folder is removed"
    with pytest.raises(FileNotFoundError):  # a second replay has nothing to send
        replay_folder(off, TrackingConfig(uri=uri))
    assert len(c.search_runs([run.info.experiment_id])) == 2  # the parent and this run, once


def test_a_run_that_never_was_is_created_by_the_replay_under_its_parent(tmp_path, store):
    uri, off = store(tmp_path), tmp_path / "job" / "tracking-offline"
    parent_id = Tracker(TrackingConfig(uri=uri), offline_dir=tmp_path / "p", experiment="outage").start()
    cfg = TrackingConfig(uri=dead_uri(), request_timeout_s=1, request_retries=0, run_name="sam",
                         parent_run_id=parent_id, tags={"sonosynth.pipeline_section": "sam"})
    tracker = Tracker(cfg, offline_dir=off, experiment="outage")
    assert tracker.start(tags={"sonosynth.stage": "train-sam"}) is None
    tracker.log_metrics({"loss": 1.0, "skipped": None}, 1)  # a value that is no number is left out
    (tmp_path / "w.txt").write_text("weights")
    tracker.log_artifact(tmp_path / "w.txt", "model")
    tracker.register("model", "never-was")
    tracker.close("FAILED")
    assert records(off)[0]["kind"] == "run" and records(off)[0]["tags"]["mlflow.parentRunId"] == parent_id
    moved = tmp_path / "copied-off-the-pod"
    shutil.move(off, moved)  # the kept copies of artifacts travel with the folder

    done = replay_folder(moved, TrackingConfig(uri=uri), parent_of=lambda tags: "not used: it had its parent")
    [run_id] = done.created
    run = client(uri).get_run(run_id)
    assert run.info.run_name == "sam" and run.info.status == "FAILED" and run.data.metrics == {"loss": 1.0}
    assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.tags["sonosynth.stage"] == "train-sam"
    assert [a.path for a in client(uri).list_artifacts(run_id, "model")] == ["model/w.txt"]
    assert done.registered == {"never-was": "1"} and not moved.exists()


def test_a_replay_cut_short_resumes_into_the_same_run_and_sends_nothing_twice(tmp_path, store, monkeypatch):
    uri, off = store(tmp_path), tmp_path / "tracking-offline"
    tracker = Tracker(TrackingConfig(uri=dead_uri(), request_timeout_s=1, request_retries=0, run_name="cut"),
                      offline_dir=off, experiment="cut")
    tracker.start()
    for step in range(1, 6):
        tracker.log_metrics({"x": float(step)}, step)
    tracker.close()
    real_send, sent = Tracker._send, []

    def send_three(self, record):
        if len(sent) == 3:
            from mlflow.exceptions import MlflowException

            raise MlflowException("API request failed with exception: Connection reset by peer")
        real_send(self, record)
        sent.append(record)

    monkeypatch.setattr(Tracker, "_send", send_three)
    with pytest.raises(ConnectionError, match="could not take the records"):
        replay_folder(off, TrackingConfig(uri=uri))
    left = records(off)
    run_id = left[0]["run_id"]
    assert [r["step"] for r in left if r["kind"] == "metrics"] == [4, 5] and run_id
    assert all(r["kind"] != "run" and r["run_id"] == run_id for r in left), "the created run is remembered"
    monkeypatch.setattr(Tracker, "_send", real_send)
    assert replay_folder(off, TrackingConfig(uri=uri)).runs == [run_id]
    c = client(uri)
    assert [m.step for m in c.get_metric_history(run_id, "x")] == [1, 2, 3, 4, 5]
    assert len(c.search_runs([c.get_experiment_by_name("cut").experiment_id])) == 1


def test_the_server_back_mid_run_gets_the_backlog_and_an_earlier_jobs_records_stay(tmp_path, store):
    uri, off = store(tmp_path), tmp_path / "tracking-offline"
    earlier = Tracker(TrackingConfig(uri=dead_uri(), request_timeout_s=1, request_retries=0), offline_dir=off,
                      experiment="back")
    earlier.start()
    earlier.log_metrics({"old": 1.0}, 1)
    earlier.close()  # an earlier attempt's records, not replayed yet
    tracker = Tracker(TrackingConfig(uri=uri, reconnect_every_s=0), offline_dir=off, experiment="back")
    run_id = tracker.start()
    (tmp_path / "m.txt").write_text("model")
    tracker.log_artifact(tmp_path / "m.txt", "model")
    lose_server(tracker)
    tracker.log_metrics({"x": 1.0}, 1)
    assert tracker.register("model", "back-model") is None and tracker.offline
    tracker._client = None  # the server is back: the next call reconnects and flushes
    tracker.log_metrics({"x": 2.0}, 2)
    assert not tracker.offline and tracker.registered == {"back-model": "1"}
    tracker.close()
    c = client(uri)
    assert [m.value for m in c.get_metric_history(run_id, "x")] == [1.0, 2.0]
    assert c.get_run(run_id).info.status == "FINISHED"
    assert {r["writer"] for r in records(off)} == {earlier.writer}, "only its own records left the file"
    assert not (off / "artifacts").exists(), "the copies of its delivered artifacts are gone"


def test_a_registration_is_made_once_even_when_it_is_sent_again(tmp_path, store):
    uri, off = store(tmp_path), tmp_path / "tracking-offline"
    tracker = Tracker(TrackingConfig(uri=uri, reconnect_every_s=3600), offline_dir=off, experiment="once")
    run_id = tracker.start()
    (tmp_path / "m.txt").write_text("model")
    tracker.log_artifact(tmp_path / "m.txt", "model")
    assert tracker.register("model", "once-model") == "1"  # online: made at once
    lose_server(tracker)  # say the alias failed after the version was made: the record is kept
    assert tracker.register("model", "once-model", alias="champion") is None
    tracker.close()
    assert replay_folder(off, TrackingConfig(uri=uri)).registered == {"once-model": "1"}
    c = client(uri)
    assert [str(v.version) for v in c.search_model_versions("name = 'once-model'")] == ["1"]
    assert c.get_model_version_by_alias("once-model", "champion").run_id == run_id


def test_a_record_the_store_refuses_is_dropped_and_does_not_block_the_rest(tmp_path, store, caplog):
    uri, off = store(tmp_path), tmp_path / "tracking-offline"
    tracker = Tracker(TrackingConfig(uri=uri, reconnect_every_s=3600), offline_dir=off, experiment="refused")
    run_id = tracker.start()
    tracker.log_params({"a": 1})
    lose_server(tracker)
    tracker.log_params({"a": 2})  # MLflow refuses a changed param
    tracker.log_metrics({"x": 1.0}, 1)
    tracker.close()
    with caplog.at_level(logging.WARNING):
        assert replay_folder(off, TrackingConfig(uri=uri)).runs == [run_id]
    assert "refused a params record" in caplog.text
    run = client(uri).get_run(run_id)
    assert run.data.params == {"a": "1"} and run.data.metrics == {"x": 1.0} and run.info.status == "FINISHED"
    assert not off.exists()


def test_params_tags_and_the_offline_file_are_redacted(tmp_path, store, monkeypatch):
    monkeypatch.setenv("SONOSYNTH_TEST_PASSWORD", SECRET)
    off = tmp_path / "tracking-offline"
    dead = dead_uri().replace("http://", "http://user:hunter2pw@")
    tracker = Tracker(TrackingConfig(uri=dead, request_timeout_s=1, request_retries=0, run_name=f"run {SECRET}"),
                      offline_dir=off, experiment="redact")
    tracker.start(tags={"sonosynth.out": f"s3://bucket/{SECRET}"})
    tracker.log_params({"tracking.uri": dead, "path": Path(f"/data/{SECRET}")})
    tracker.log_tags({"why": f"failed with {SECRET}"})
    (tmp_path / "config.yaml").write_text(f"uri: {dead}\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.close()
    text = "".join(p.read_text() for p in off.rglob("*") if p.is_file())
    assert SECRET not in text and "hunter2pw" not in text
    assert "***SONOSYNTH_TEST_PASSWORD" in text and "user:***@" in text
    uri = store(tmp_path)
    [run_id] = replay_folder(off, TrackingConfig(uri=uri)).runs
    run = client(uri).get_run(run_id)
    shown = json.dumps([run.info.run_name, run.data.params, run.data.tags])
    assert SECRET not in shown and "hunter2pw" not in shown and "user:***@" in run.data.params["tracking.uri"]
    assert "hunter2pw" not in Path(client(uri).download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()


# -- the pipeline's side: lost at the start, back mid-run ----------------------------------------------

class ToyConfig(Config):
    out: str
    """Output."""
    n: int = 1
    """A number."""


class ToyModelConfig(ToyConfig):
    tracking: TrackingConfig = TrackingConfig()
    """Tracking (the stage tracks itself, like the training stages)."""


def toy_model(cfg: ToyModelConfig):
    """A stage that tracks itself and registers its model, like the training stages."""
    from sonosynth.infra.jobdir import offline_dir_for
    from sonosynth.infra.stage import Report

    tracker = Tracker(cfg.tracking, experiment="toy", offline_dir=offline_dir_for(cfg.out))
    tracker.start(tags={"sonosynth.stage": "toy-model"})
    tracker.log_metrics({"n": cfg.n}, 0)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.txt").write_text("weights")
        tracker.log_artifact(Path(tmp) / "model.txt", "model")
    version = tracker.register("model", "toy-model")
    tracker.close()
    return Report(stage="toy-model", out=cfg.out, figures={"n": cfg.n},
                  tracking={"uri": tracker.uri, "run_id": tracker.run_id, "version": version,
                            "registered_model": "toy-model" if version else None, "offline": tracker.offline})


@dataclass
class ToyPipeline:
    run: Callable[[], Any]
    uri: str
    out: str
    down: dict[str, bool]
    """MLflow is down while ``now``; ``until_a_runs`` brings it back while section a runs."""
    path: Path

    def offline_files(self) -> list[Path]:
        """The offline records of this plan's runs (beside a local OUT; temp folders for S3)."""
        from sonosynth.infra.jobdir import offline_dir_for
        from sonosynth.launch.pipeline import pipeline_key, plan, resolve_pipeline

        steps = plan(resolve_pipeline(str(self.path), {}, []))
        folders = [offline_dir_for(s.out) for s in steps] + [
            offline_dir_for(f"{self.out}/_pipeline/{pipeline_key(steps)}")]
        return [f / OFFLINE_FILE for f in folders if (f / OFFLINE_FILE).is_file()]


@pytest.fixture(params=["local"])
def toy_pipeline(request, tmp_path, store, monkeypatch):
    """Two instant sections, ``a`` tracked by the pipeline and ``b`` by itself (it registers a
    model), into a local OUT or (param ``s3``) one on moto_server."""
    from sonosynth.infra.stage import Report
    from sonosynth.launch import stages
    from sonosynth.launch.pipeline import resolve_pipeline, run

    down = {"now": False, "until_a_runs": False}
    connect = Tracker._connect
    monkeypatch.setattr(Tracker, "_connect", lambda self: Down() if down["now"] else connect(self))

    def toy(cfg: ToyConfig) -> Report:
        if down["until_a_runs"]:
            down["now"] = False
        return Report(stage="toy", out=cfg.out, text=f"n={cfg.n}", figures={"n": cfg.n})

    monkeypatch.setitem(stages.STAGES, "toy", stages.Stage("toy", "t", lambda: (ToyConfig, toy)))
    monkeypatch.setitem(stages.STAGES, "toy-model", stages.Stage("toy-model", "t", lambda: (ToyModelConfig, toy_model)))
    out = str(tmp_path / "out") if request.param == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    path = tmp_path / "pipe.yaml"
    path.write_text(json.dumps({"out": out, "stages": {"a": {"stage": "toy", "n": 1},
                                                      "b": {"stage": "toy-model", "n": 2}}}))
    uri = store(tmp_path)
    return ToyPipeline(lambda: run(resolve_pipeline(str(path), {}, [f"tracking.uri={uri}", "tracking.experiment=toy"])),
                       uri, out, down, path)


def toy_runs(uri):
    """(the parent run, {section: its run}); fails if any is there twice."""
    c = client(uri)
    found = c.search_runs([c.get_experiment_by_name("toy").experiment_id])
    [parent] = [r for r in found if r.data.tags.get("sonosynth.stage") == "pipeline"]
    sections = {r.data.tags["sonosynth.pipeline_section"]: r for r in found if r is not parent}
    assert len(sections) == len(found) - 1, "a section has two runs"
    return parent, sections


def test_a_pipeline_that_starts_without_the_server_nests_every_run_once_it_is_back(toy_pipeline):
    toy = toy_pipeline
    toy.down.update(now=True, until_a_runs=True)  # lost at the start, back while section a runs
    report = toy.run()
    assert report.failed is None and report.tracking["run_id"] and not report.tracking["offline"]
    parent, sections = toy_runs(toy.uri)
    assert sorted(sections) == ["a", "b"]
    assert {r.data.tags.get("mlflow.parentRunId") for r in sections.values()} == {parent.info.run_id}
    assert sections["a"].data.metrics == {"n": 1.0} and sections["a"].info.status == "FINISHED"
    assert not toy.offline_files()
    [record] = Path(toy.out, "_pipeline").glob("*/run.json")
    assert json.loads(record.read_text())["run_id"] == parent.info.run_id


@pytest.mark.parametrize("toy_pipeline", ["local", "s3"], indirect=True)
def test_a_pipeline_replays_once_the_server_is_back_and_says_so_in_one_line(toy_pipeline, capsys):
    from sonosynth.infra.storage import open_storage

    toy = toy_pipeline
    toy.down["now"] = True
    assert toy.run().failed is None  # the whole run without the server
    kept = toy.offline_files()
    assert len(kept) == 3  # the parent's and both sections'
    capsys.readouterr()
    assert toy.run().failed is None  # still down: the records wait
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tracking: ")]
    assert len(said) == 1 and said[0].startswith("tracking: 3 of 3 tracking-offline folders could not be replayed")
    assert "failed with exception Max retries exceeded" in said[0] and said[0].endswith("stay for the next run")
    assert toy.offline_files() == kept
    toy.down["now"] = False
    assert toy.run().failed is None
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tracking: ")]
    assert len(said) == 1 and said[0].startswith("tracking: replayed") and "(1 pipeline, 2 section folders)" in said[0]
    assert not toy.offline_files() and not any(f.parent.exists() for f in kept)
    parent, sections = toy_runs(toy.uri)
    assert {r.data.tags.get("mlflow.parentRunId") for r in sections.values()} == {parent.info.run_id}
    assert {s: r.data.metrics for s, r in sections.items()} == {"a": {"n": 1.0}, "b": {"n": 2.0}}
    assert "; registered toy-model version 1" in said[0]
    [version] = client(toy.uri).search_model_versions("name = 'toy-model'")
    assert version.run_id == sections["b"].info.run_id
    store = open_storage(toy.out)
    [done] = [k for k in store.list("b/") if k.endswith(DONE)]  # ${b.tracking.version} has it now
    assert json.loads(store.get_text(done))["report"]["tracking"] | {"run_id": None, "uri": None} == {
        "registered_model": "toy-model", "version": "1", "offline": False, "run_id": None, "uri": None}
    assert toy.run().failed is None  # a second replay has nothing to send
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("tracking: ")]
    assert toy_runs(toy.uri)[1].keys() == sections.keys()
