"""Secrets never reach an output, a log or MLflow: distinctive fake credentials (S3 keys, a
session token, a password in the tracking URI) in the environment of a real stage run through
the CLI (generate, to S3 on moto_server, tracked on the MLflow server) and of a real pipeline
(an ingest, tracked by the pipeline on the same server), then every output folder, S3 object,
log, MLflow param, tag and artifact is searched for them. The Ray job's runtime env is checked
in test_stack_submit.py (it needs the stack's Ray)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

DB_PASSWORD = "leak-db-password-XYZ"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIASONOSYNTHLEAKTEST1",
    "AWS_SECRET_ACCESS_KEY": "sonosynth-leak-secret-4b7d1e9a0c",
    "AWS_SESSION_TOKEN": "sonosynth-leak-session-token-8e2f6a",
}
"""The environment's secrets (moto_server accepts any keys)."""
FORBIDDEN = [*SECRETS.values(), DB_PASSWORD]


def password_uri(mlflow_url: str) -> str:
    """The session MLflow server with a password in its URI (MLflow's client sends it as basic
    auth; the server, which has no auth, ignores it)."""
    return mlflow_url.replace("http://", f"http://sonosynth:{DB_PASSWORD}@", 1)


# -- searching ---------------------------------------------------------------------------------

def leaks_in(data: bytes, where: str) -> list[str]:
    return [f"{where}: {value[:12]}..." for value in FORBIDDEN if value.encode() in data]


def search_folder(folder: Path) -> tuple[list[str], int]:
    """(leaks, files searched) of every file under ``folder``, text or binary."""
    found, n = [], 0
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # a socket, a file Ray removed meanwhile
                continue
            n += 1
            found += leaks_in(data, str(path))
    return found, n


def search_bucket(bucket: str, endpoint: str) -> tuple[list[str], int]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    found, n = [], 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            n += 1
            found += leaks_in(obj["Key"].encode(), f"s3://{bucket} key {obj['Key']}")
            found += leaks_in(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read(), f"s3://{bucket}/{obj['Key']}")
    return found, n


def search_mlflow(url: str, experiments: list[str], dest: Path) -> tuple[list[str], dict[str, int]]:
    """Every run of ``experiments``: name, params, tags, metric names and every artifact."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    ids = [e.experiment_id for e in (client.get_experiment_by_name(n) for n in experiments) if e]
    found, seen = [], {"runs": 0, "params": 0, "tags": 0, "artifacts": 0}
    for run in client.search_runs(ids):
        rid = run.info.run_id
        seen["runs"] += 1
        seen["params"] += len(run.data.params)
        seen["tags"] += len(run.data.tags)
        record = json.dumps({"name": run.info.run_name, "params": run.data.params, "tags": run.data.tags,
                             "metrics": sorted(run.data.metrics), "artifact_uri": run.info.artifact_uri})
        found += leaks_in(record.encode(), f"mlflow run {rid} params/tags")
        if client.list_artifacts(rid):
            local = Path(client.download_artifacts(rid, "", str(dest / rid)))
            more, n = search_folder(local)
            found += more
            seen["artifacts"] += n
    return found, seen


class EnvWatch:
    """The secret names seen in the environment of a process and of every process it starts
    (Ray's workers included), read from /proc while it runs: proof the search has something
    to find."""

    def __init__(self):
        self.seen: dict[str, set[str]] = {}

    def poll(self, pid: int) -> None:
        import psutil

        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                env, cmd = p.environ(), " ".join(p.cmdline())
            except (psutil.Error, OSError):
                continue
            kind = "ray worker" if "default_worker.py" in cmd or "ray::" in cmd else "sonosynth"
            for name, value in SECRETS.items():
                if env.get(name) == value:
                    self.seen.setdefault(kind, set()).add(name)


def run_watched(procs, args: list[str], *, env: dict, cwd: Path, log: Path, timeout: float = 300) -> EnvWatch:
    """``sonosynth ARGS`` with its output in ``log``, its environment watched while it runs."""
    watch = EnvWatch()
    with open(log, "w") as fh:
        proc = procs.start(args, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                watch.poll(proc.pid)
                assert time.monotonic() < deadline, f"sonosynth {args[0]} took over {timeout} s"
                time.sleep(0.3)
        finally:
            if proc.poll() is None:
                procs.kill_tree(proc)
    assert proc.returncode == 0, f"sonosynth {' '.join(args)} -> {proc.returncode}:\n{log.read_text()[-6000:]}"
    return watch


# -- the runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("secrets")


@pytest.fixture
def secret_env(procs, moto_endpoint, work):
    """The children's environment: the fake secrets, moto's endpoint, a Ray temp folder of our own
    (its logs are searched too) and no tracking URI of the session's."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = procs.env(**SECRETS, AWS_ENDPOINT_URL=moto_endpoint, AWS_DEFAULT_REGION="us-east-1",
                    RAY_TMPDIR=str(ray_tmp))
    yield env, ray_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


GENERATE = ["--num-samples", "4", "--set", "shard_size=2", "--workers", "1", "--set", "sampler.steps=2",
            "--set", "max_attempts=20", "--set", "qc.max_rel_rmse=0.9", "--set", "qc.min_coverage=0.0"]


def test_a_stage_to_s3_leaves_no_secret_in_its_outputs_logs_or_mlflow(work, tiny_lora, s3_bucket, moto_endpoint,
                                                                     mlflow_url, secret_env, procs):
    from sonosynth.infra.jobdir import offline_dir_for
    from sonosynth.infra.storage import open_storage

    env, ray_tmp = secret_env
    out = f"s3://{s3_bucket}/synthetic"
    uri = password_uri(mlflow_url)
    log = work / "generate.log"
    t0 = time.monotonic()
    watch = run_watched(procs, ["generate", "generate_tiny", "--out", out, "--lora", str(tiny_lora), *GENERATE,
                                "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=secrets-stage",
                                "--no-progress"], env=env, cwd=work, log=log)
    seconds = time.monotonic() - t0
    # the secrets were there to leak: in the job's and its Ray workers' environment, and the
    # tracking URI with its password in the job's config (redacted where it was written)
    assert watch.seen.get("sonosynth") == set(SECRETS), watch.seen
    assert watch.seen.get("ray worker") == set(SECRETS), watch.seen
    stored = open_storage(out, None)
    assert f"sonosynth:***@{mlflow_url.removeprefix('http://')}" in stored.get_text("config.yaml")
    assert stored.exists("job.json") and stored.exists("summary.json")
    run_id = json.loads(stored.get_text("summary.json"))["mlflow"]["run_id"]
    assert run_id, "the run was not tracked on the MLflow server"

    found, n_objects = search_bucket(s3_bucket, moto_endpoint)
    ray_found, ray_files = search_folder(ray_tmp)  # the local Ray's session: its logs, its workers' output
    assert ray_files > 10, f"Ray wrote nothing under RAY_TMPDIR={ray_tmp}"
    found += search_folder(work)[0] + ray_found + search_folder(offline_dir_for(out))[0]
    more, seen = search_mlflow(mlflow_url, ["secrets-stage"], work / "mlflow-stage")
    assert not found + more, "secrets leaked:\n" + "\n".join(found + more)
    assert n_objects >= 5 and seen["runs"] == 1 and seen["params"] > 10 and seen["artifacts"] >= 3, seen
    print(f"generate with secrets: {seconds:.0f} s; searched {n_objects} S3 objects, {seen}")


def pipeline_recipe(work: Path) -> Path:
    """One ingest: the pipeline tracks it itself (its params, its report) under the parent run,
    and writes its lineage, report and records; generate's tracked path is the stage test's."""
    path = work / "secrets-pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "out": str(work / "pipeline"), "tracking": {"experiment": "secrets-pipeline"},
        "stages": {"real": {"stage": "ingest", "cohort": {"name": "phantom", "phantom": {
            "num": 8, "height": 64, "width": 64, "seed": 0}}}}}, sort_keys=False))
    return path


def test_a_pipeline_leaves_no_secret_in_its_outputs_logs_or_mlflow(work, mlflow_url, secret_env, procs):
    env, _ = secret_env
    env = {**env, "MLFLOW_TRACKING_URI": password_uri(mlflow_url)}
    log = work / "pipeline.log"
    t0 = time.monotonic()
    watch = run_watched(procs, ["pipeline", str(pipeline_recipe(work)), "--no-progress"], env=env, cwd=work, log=log)
    seconds = time.monotonic() - t0
    assert watch.seen.get("sonosynth") == set(SECRETS), watch.seen
    out = work / "pipeline"
    assert "ran 1 stages" in log.read_text(), log.read_text()[-3000:]
    assert (out / "pipeline.json").is_file() and (out / "report.html").is_file()
    [done] = out.glob("real/*/_PIPELINE_DONE.json")
    assert json.loads(done.read_text())["report"]["tracking"]["run_id"]

    found, n_files = search_folder(work)
    more, seen = search_mlflow(mlflow_url, ["secrets-pipeline"], work / "mlflow-pipeline")
    assert not found + more, "secrets leaked:\n" + "\n".join(found + more)
    assert seen["runs"] == 2 and seen["params"] > 5 and seen["artifacts"] >= 5, seen  # the parent's, the ingest's
    print(f"pipeline with secrets: {seconds:.0f} s; searched {n_files} files, {seen}")


def test_the_search_finds_a_secret_where_there_is_one(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.txt").write_text(f"connecting to http://sonosynth:{DB_PASSWORD}@host")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01" + SECRETS["AWS_SECRET_ACCESS_KEY"].encode() + b"\xff")
    found, n = search_folder(tmp_path)
    assert n == 2 and len(found) == 2
