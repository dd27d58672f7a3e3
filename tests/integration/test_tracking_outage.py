"""The tracking server lost mid-pipeline: a real `mlflow server` (SQLite, served artifacts) is
killed while a pipeline runs and stays down until the pipeline has finished (exit 0, every
tracker offline); started again on the same port and store, the same pipeline command replays
the records left behind, so every run ends up once, nested under the one parent run, with
its params, metrics and artifacts, as if the server had never left.

A job tracked from this process lives through the same outage and gets its backlog
(metrics, a text artifact, a model registration) delivered by itself once the server is back.

One module-scoped scenario backs every test (a server start costs seconds on 2 cores).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sonosynth.infra.local_s3 import _free_port
from sonosynth.infra.tracking import OFFLINE_FILE, Tracker, TrackingConfig

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "outage"
SLOW = 600
"""Samples of the second section: its ingest runs long enough (a second or more) for its run to be
seen on the server and the server killed under it."""


class Server:
    """``mlflow server`` on a fixed port and store, which a test kills and starts again."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> None:
        exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server on {self.url} did not start:\n"
                                f"{(self.root / 'server.log').read_text()[-3000:]}")
                time.sleep(0.2)

    def kill(self, procs) -> None:
        """SIGKILL the server and its workers: requests in flight are cut, new ones refused."""
        if self.proc is not None and self.proc.poll() is None:
            procs.kill_tree(self.proc)
        self.proc = None


def recipe(path: Path, out: Path, url: str) -> Path:
    def ingest(num: int, seed: int, size: int) -> dict:
        return {"stage": "ingest", "shards": {"max_samples": 100},
                "cohort": {"name": "phantom", "phantom": {"num": num, "height": size, "width": size, "seed": seed}}}

    path.write_text(yaml.safe_dump({
        "name": "outage", "out": str(out),
        "tracking": {"uri": url, "experiment": EXPERIMENT, "request_timeout_s": 5, "request_retries": 0},
        "stages": {"first": ingest(8, 0, 64), "second": ingest(SLOW, 1, 96), "third": ingest(8, 2, 64)}},
        sort_keys=False))
    return path


def section_runs(url: str) -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    found: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id]) if exp else []:
        tags = run.data.tags
        found.setdefault("(parent)" if tags.get("sonosynth.stage") == "pipeline"
                         else tags.get("sonosynth.pipeline_section", "?"), []).append(run)
    return found


@dataclass
class Outage:
    out: Path
    url: str
    first: subprocess.CompletedProcess
    again: subprocess.CompletedProcess
    offline_after_first: list[str]
    second_run_id: str
    job: Tracker
    job_run_id: str


@pytest.fixture(scope="module")
def outage(tmp_path_factory, procs):
    work = tmp_path_factory.mktemp("outage")
    server = Server(work / "server")
    server.start()
    try:
        out = work / "out"
        command = ["pipeline", str(recipe(work / "outage.yaml", out, server.url)), "--no-progress"]
        job = Tracker(TrackingConfig(uri=server.url, reconnect_every_s=0, request_timeout_s=5, request_retries=0),
                      offline_dir=work / "job" / "tracking-offline", experiment="outage-job")
        job_run_id = job.start(tags={"sonosynth.stage": "train-sam"})
        job.log_params({"lr": 0.1})
        job.log_metrics({"loss": 1.0}, 1)

        with open(work / "first.log", "w") as log:
            proc = procs.start(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                procs.wait_until(lambda: bool(list(out.glob("first/*/_PIPELINE_DONE.json"))), proc, timeout=300,
                                 what="the pipeline, before its first section finished")
                procs.wait_until(lambda: bool(section_runs(server.url).get("second")), proc, timeout=120,
                                 what="the pipeline, before its second section's run was created")
                [second] = section_runs(server.url)["second"]
                server.kill(procs)  # the server is lost while the second section runs, until the pipeline ends
                assert not list(out.glob("second/*/_PIPELINE_DONE.json")), "second finished before the server died"

                job.log_metrics({"loss": 0.5}, 2)  # the job goes offline, nothing raises
                job.log_text("lost mid-run\n", "notes/outage.txt")
                (work / "model").mkdir()
                (work / "model" / "weights.bin").write_bytes(b"\0" * 64)
                job.log_artifact(work / "model", "model")
                assert job.register("model", "outage-model") is None and job.offline
                proc.wait(timeout=300)
            finally:
                procs.kill_tree(proc)
        first = subprocess.CompletedProcess(proc.args, proc.returncode, (work / "first.log").read_text(), "")
        offline = sorted(str(p.parent.relative_to(out)) for p in out.rglob(OFFLINE_FILE))

        server.start()  # same port, same store
        job.log_metrics({"loss": 0.25}, 3)  # due for a retry: reconnects, the backlog goes first
        job.close()
        again = procs.cli(command, cwd=REPO, timeout=300)
        (work / "again.log").write_text(again.stdout + again.stderr)
        yield Outage(out, server.url, first, again, offline, second.info.run_id, job, job_run_id)
    finally:
        server.kill(procs)


def test_the_pipeline_finishes_while_the_server_is_down_and_keeps_the_records(outage):
    assert outage.first.returncode == 0, outage.first.stdout[-4000:]
    assert "pipeline outage: finished; ran 3 stages" in outage.first.stdout
    assert "training goes on, and what cannot be delivered is kept" in outage.first.stdout
    parents = [p for p in outage.offline_after_first if p.startswith("_pipeline/")]
    sections = sorted(p.split("/")[0] for p in outage.offline_after_first if p not in parents)
    assert len(parents) == 1 and sections == ["second", "third"], outage.offline_after_first


def test_the_next_run_replays_every_record_once_nested_under_the_one_parent(outage):
    stdout = outage.again.stdout
    before = stdout.split("pipeline outage ->")[0].strip().splitlines()  # what the run said before its sections
    assert len(before) == 1 and re.match(r"tracking: replayed 1[45] records of 3 runs ", before[0]), before
    assert "ran 0 stages" in stdout and "skipped 3 already done" in stdout
    assert not list(outage.out.rglob("tracking-offline")), "replayed folders are removed"

    from mlflow import MlflowClient

    client = MlflowClient(outage.url)
    runs = section_runs(outage.url)
    assert sorted(runs) == ["(parent)", "first", "second", "third"]
    assert all(len(rs) == 1 for rs in runs.values()), {k: len(v) for k, v in runs.items()}
    [parent] = runs["(parent)"]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"lineage.csv", "pipeline.yaml"}
    for section, num in (("first", 8), ("second", SLOW), ("third", 8)):
        [run] = runs[section]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, section
        assert run.info.status == "FINISHED", section
        assert run.data.params["cohort.phantom.num"] == str(num), section
        assert run.data.metrics["ingested"] == num, section
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.txt"], section
    assert runs["second"][0].info.run_id == outage.second_run_id, "the run created before the loss got the rest"


def test_a_job_gets_its_backlog_and_registration_delivered_when_the_server_is_back(outage):
    from mlflow import MlflowClient

    client = MlflowClient(outage.url)
    job = outage.job
    assert not job.offline and job.registered == {"outage-model": "1"}
    run = client.get_run(outage.job_run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert [(m.step, m.value) for m in client.get_metric_history(outage.job_run_id, "loss")] == [
        (1, 1.0), (2, 0.5), (3, 0.25)]
    assert [a.path for a in client.list_artifacts(outage.job_run_id, "notes")] == ["notes/outage.txt"]
    assert [a.path for a in client.list_artifacts(outage.job_run_id, "model")] == ["model/weights.bin"]
    [version] = client.search_model_versions("name = 'outage-model'")
    assert version.run_id == outage.job_run_id
    assert not job.offline_dir.exists()

