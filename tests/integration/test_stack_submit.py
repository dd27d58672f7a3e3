"""The cluster path on one machine: `sonosynth stack up` (a real Ray head with its job server and
token auth, a real MLflow server with artifacts in S3, a real moto_server), then stages sent as
Ray jobs with `sonosynth submit`, read back from MLflow and S3, and `stack down` leaving no
process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sonosynth.infra.local import stack

pytestmark = pytest.mark.integration
SONOSYNTH = str(Path(sys.executable).with_name("sonosynth"))
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack-submit")


@pytest.fixture(scope="module")
def up(work, procs):
    """`sonosynth stack up`; the environment of its env.sh; `stack down` at the end whatever happens."""
    folder = work / "stack"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    t0 = time.monotonic()
    proc = procs.cli(["stack", "up", "--dir", str(folder), "--ray-cpus", "2"], env=base, cwd=work, timeout=400)
    state = stack.load_state(folder)
    env = {**base, **stack.client_env(state)}
    yield {"folder": folder, "state": state, "env": env, "up_s": time.monotonic() - t0, "stdout": proc.stdout}
    stack.down(folder)


def test_stack_up_starts_three_healthy_servers_with_pids_and_logs(up, work, procs):
    state, folder = up["state"], up["folder"]
    assert set(state["services"]) == {"s3", "mlflow", "ray-head"}
    for name, entry in state["services"].items():
        assert stack._is_ours(entry["pid"], state["id"]), name
        assert Path(entry["log"]).is_file() and Path(entry["log"]).parent == folder / "logs"
    status = procs.cli(["stack", "status", "--dir", str(folder)], env=up["env"], cwd=work)
    assert status.stdout.count("healthy") == 3, status.stdout
    env_sh = (folder / "env.sh").read_text()
    assert "RAY_AUTH_TOKEN_PATH=" in env_sh and Path(state["token_file"]).read_text().strip() not in env_sh
    # the job server wants the token: no token, no answer
    from urllib.request import urlopen

    with pytest.raises(Exception, match="401|Unauthorized"):
        urlopen(state["services"]["ray-head"]["url"] + "/api/jobs/", timeout=5)
    # a second `up` finds the running stack and starts nothing
    again = procs.cli(["stack", "up", "--dir", str(folder)], env=up["env"], cwd=work)
    assert stack.load_state(folder)["services"] == state["services"], again.stdout


@pytest.fixture(scope="module")
def dataset(up, work, procs) -> str:
    """A phantom dataset in the stack's S3, written by an ingest job."""
    out = "s3://sonosynth/phantom"
    procs.cli(["submit", "--wait", "--", "ingest", "--cohort", "phantom", "--num-samples", "16", "--out", out,
               "--set", "cohort.phantom.height=96", "--set", "cohort.phantom.width=96", "--no-progress"],
              env=up["env"], cwd=work)
    return out


@pytest.fixture(scope="module")
def train_job(up, work, dataset, procs):
    args = ["submit", "--wait", "--", "train-lora", "lora_joint_tiny", "--out", "s3://sonosynth/lora/joint",
            "--dataset", dataset, "--set", "engine.max_steps=10", "--set", "engine.checkpoint_every=10",
            "--set", "engine.eval_every=10", "--set", "preview.num=1"]
    t0 = time.monotonic()
    proc = procs.cli(args, env=up["env"], cwd=work)
    return proc, time.monotonic() - t0


def _job_id(stderr: str) -> str:
    return stderr.split("submitted job ", 1)[1].split()[0]


def _jobs_client(state):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(state["services"]["ray-head"]["url"], headers=stack.auth_headers(state))


def test_train_lora_job_runs_from_the_shipped_wheel_not_the_repo(up, train_job):
    proc, _ = train_job
    logs = proc.stdout
    line = next(x for x in logs.splitlines() if x.startswith("sonosynth 0.1.0 from "))
    where = line.split(" from ", 1)[1].split(" (", 1)[0]
    assert str(REPO) not in where and "runtime_resources/py_modules_files" in where, line
    assert "(wheel sonosynth 0.1.0 sha256:" in line
    info = _jobs_client(up["state"]).get_job_info(_job_id(proc.stderr))
    assert "working_dir" not in (info.runtime_env or {}) and info.runtime_env.get("py_modules")
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= set(info.runtime_env["env_vars"])
    assert "values not shown" in proc.stderr and "testing" not in proc.stderr
    assert "trained 10 steps" in logs and "exit status 0" in proc.stderr


def test_a_followed_job_shows_sonosynth_lines_and_its_logs_folder_holds_the_rest(up, train_job, monkeypatch):
    from sonosynth.infra.storage import open_storage

    proc, _ = train_job
    for noise in ("RayTrainWorker", "TrainController", "FutureWarning", "core_worker", "(pid=", "\r", "\x1b["):
        assert noise not in proc.stdout + proc.stderr, f"{noise!r} in submit --wait's output:\n{proc.stdout[-3000:]}"
    assert "logs: s3://sonosynth/lora/joint/logs" in proc.stdout
    assert "train-lora: 10/10 step (100%) in " in proc.stdout  # a plain progress line: not a terminal
    use_stack_s3(up["env"], monkeypatch)
    names = open_storage("s3://sonosynth/lora/joint/logs").list("")
    assert "driver.log" in names and any(n.startswith("RayTrainWorker-") for n in names), names


def use_stack_s3(env: dict, monkeypatch) -> None:
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)


def test_train_lora_run_and_registered_model_are_in_mlflow_and_s3(up, train_job, monkeypatch):
    from mlflow import MlflowClient

    from sonosynth.infra.storage import open_storage

    env = up["env"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("sonosynth-train-lora")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    versions = client.search_model_versions("name='sonosynth-lora'")
    assert [v.run_id for v in versions] == [run_id]
    assert {"model", "summary.json"} <= {a.path for a in client.list_artifacts(run_id)}
    use_stack_s3(env, monkeypatch)
    bucket = open_storage("s3://sonosynth/")
    assert bucket.exists("lora/joint/model/pytorch_lora_weights.safetensors")
    artifacts = bucket.list("mlflow/")  # the MLflow server keeps its artifacts in S3 too
    assert any(k.endswith("pytorch_lora_weights.safetensors") for k in artifacts), artifacts[:20]


@pytest.fixture(scope="module")
def generate_job(up, work, train_job, procs):
    args = ["submit", "--wait", "--", "generate", "generate_tiny", "--out", "s3://sonosynth/synthetic/run1",
            "--lora", "models:/sonosynth-lora/1", "--num-samples", "8", "--workers", "2",
            "--set", "shard_size=4"]
    t0 = time.monotonic()
    proc = procs.cli(args, env=up["env"], cwd=work)
    return proc, time.monotonic() - t0


def test_generate_job_writes_shards_to_s3_and_is_tracked(up, generate_job, monkeypatch):
    from mlflow import MlflowClient

    from sonosynth.datasets.reader import DatasetReader
    from sonosynth.infra.storage import open_storage

    proc, _ = generate_job
    assert "generated 8/8 samples" in proc.stdout
    env = up["env"]
    use_stack_s3(env, monkeypatch)
    out = "s3://sonosynth/synthetic/run1"
    shards = [k for k in open_storage(out).list("shards/") if k.endswith(".tar")]
    assert len(shards) == 2
    keys = [s.key for s in DatasetReader(out, distributed=False).samples()]
    assert len(keys) == len(set(keys)) == 8
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("sonosynth-generate").experiment_id])
    assert [r.data.metrics["accepted"] for r in runs if r.data.params.get("out") == out] == [8.0]


def test_job_exit_status_becomes_the_commands(up, work, train_job, procs):
    bad = procs.cli(["submit", "--wait", "--", "generate", "generate_tiny", "--out", "s3://sonosynth/x",
                     "--set", "no_such_key=1"], env=up["env"], cwd=work, check=False)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "unknown key" in bad.stdout + bad.stderr
    # refused here, before anything is submitted
    verb = procs.cli(["submit", "--", "no-such-verb"], env=up["env"], cwd=work, check=False)
    assert verb.returncode == 2 and "train-lora" in verb.stderr
    no_token = {k: v for k, v in up["env"].items() if not k.startswith("RAY_AUTH")}
    denied = procs.cli(["submit", "--", "config", "generate"], env=no_token, cwd=work, check=False)
    assert denied.returncode == 2 and "token" in denied.stderr, denied.stderr


def test_ctrl_c_stops_the_job_and_jobs_verbs_see_it(up, work, train_job, procs):
    env = up["env"]
    args = [SONOSYNTH, "submit", "--wait", "--", "ingest", "--cohort", "phantom", "--num-samples", "200000",
            "--out", str(work / "never-finished"), "--no-progress"]
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "sonosynth 0.1.0 from" not in seen:  # the job's first line: it is running
            assert proc.poll() is None and time.monotonic() < deadline, seen
            seen += proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    job = _job_id(err)
    listed = json.loads(procs.cli(["jobs", "list", "--json"], env=env, cwd=work).stdout)
    assert {r["id"]: r["status"] for r in listed}[job] == "STOPPED"
    assert "sonosynth 0.1.0 from" in procs.cli(["jobs", "logs", job], env=env, cwd=work).stdout


LEAKS = {"AWS_ACCESS_KEY_ID": "AKIASONOSYNTHLEAKTEST1", "AWS_SECRET_ACCESS_KEY": "sonosynth-leak-secret-4b7d1e9a0c",
         "MLFLOW_TRACKING_PASSWORD": "sonosynth-leak-mlflow-password-2c"}
DB_PASSWORD = "leak-db-password-XYZ"


def test_no_secret_reaches_a_jobs_runtime_env_command_or_logs(up, work, procs):
    """The client holds distinctive secrets (S3 keys, an MLflow password, the password in its
    tracking URI, the stack's Ray token in RAY_AUTH_TOKEN); none of them is in what the job
    server keeps (runtime env, entrypoint, metadata), the job's logs, what submit printed or the
    job's outputs in S3."""
    state, mlflow = up["state"], up["env"]["MLFLOW_TRACKING_URI"]
    token = Path(state["token_file"]).read_text().strip()
    env = {**{k: v for k, v in up["env"].items() if k != "RAY_AUTH_TOKEN_PATH"}, **LEAKS, "RAY_AUTH_TOKEN": token,
           "MLFLOW_TRACKING_URI": mlflow.replace("http://", f"http://sonosynth:{DB_PASSWORD}@", 1)}
    forbidden = [*LEAKS.values(), DB_PASSWORD, token]

    refused = procs.cli(["submit", "--env", "AWS_SECRET_ACCESS_KEY", "--", "config", "generate"], env=env, cwd=work,
                        check=False)
    assert refused.returncode == 2 and "--env AWS_SECRET_ACCESS_KEY: AWS_SECRET_ACCESS_KEY holds a secret" \
        in refused.stderr, refused.stderr[-2000:]
    out = "s3://sonosynth/secrets/ingest"
    proc = procs.cli(["submit", "--wait", "--", "ingest", "--cohort", "phantom", "--num-samples", "4", "--out", out,
                      "--set", "cohort.phantom.height=64", "--set", "cohort.phantom.width=64", "--no-progress"],
                     env=env, cwd=work)  # authenticated with RAY_AUTH_TOKEN alone: the token was there to leak
    assert "warning: MLFLOW_TRACKING_URI holds a password; the job gets " + mlflow in proc.stderr, proc.stderr
    assert "ingested 4 samples" in proc.stdout
    jobs = _jobs_client(state)
    sid = _job_id(proc.stderr)
    info = jobs.get_job_info(sid)
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == mlflow  # stripped, and the job still ran
    kept = json.dumps({"runtime_env": info.runtime_env, "entrypoint": info.entrypoint, "metadata": info.metadata,
                       "listed": [j.runtime_env for j in jobs.list_jobs() if j.submission_id == sid]})
    texts = {"the job's record": kept, "the job's logs": jobs.get_job_logs(sid),
             "submit's output": proc.stdout + proc.stderr + refused.stdout + refused.stderr}
    import boto3

    s3 = boto3.client("s3", endpoint_url=up["env"]["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sonosynth", Prefix="secrets/")["Contents"]]
    assert {"secrets/ingest/config.yaml", "secrets/ingest/job.json"} <= set(keys)
    for key in keys:
        texts[f"s3://sonosynth/{key}"] = s3.get_object(Bucket="sonosynth", Key=key)["Body"].read().decode("latin-1")
    leaks = [f"{where}: {value[:12]}..." for where, text in texts.items() for value in forbidden if value in text]
    assert not leaks, "secrets reached the job:\n" + "\n".join(leaks)


NIGHTLY = ["submit", "--wait", "--", "pipeline", "nightly_heads_tiny", "--set", "out=s3://sonosynth/nightly",
           "--set", "real.cohort.src=s3://sonosynth/sources/hc18", "--set", "evalset.cohort.src=s3://sonosynth/sources/es",
           "--no-progress"]


def publish_heads(env: dict, shared: Path, names: list[str], prefix: str, sample: str = "hc18_sample") -> None:
    """Labelled heads (image/ + mask/) into the stack's S3, as a hospital's export would land."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for name in names:
        mask = name.replace(".png", "_Annotation.png")
        s3.upload_file(str(shared / sample / "image" / name), "sonosynth", f"{prefix}/image/{name}")
        s3.upload_file(str(shared / sample / "mask" / mask), "sonosynth", f"{prefix}/mask/{mask}")


@pytest.fixture(scope="module")
def nightly(up, work, shared_data, procs):
    """The nightly rehearsed: first night, a night with nothing new, a night with new labelled heads."""
    env = up["env"]
    heads = sorted(p.name for p in (shared_data / "hc18_sample" / "image").glob("*.png"))
    held_out = sorted(p.name for p in (shared_data / "es_head_sample" / "image").glob("*.png"))
    publish_heads(env, shared_data, heads[:24], "sources/hc18")
    publish_heads(env, shared_data, held_out, "sources/es", "es_head_sample")
    nights = {}
    for night in ("first", "nothing new", "new data"):
        if night == "new data":
            publish_heads(env, shared_data, heads[24:32], "sources/hc18")
        t0 = time.monotonic()
        nights[night] = (procs.cli(NIGHTLY, env=env, cwd=work, timeout=900), time.monotonic() - t0)
    return nights


def test_the_nightly_retrains_on_new_labelled_data_and_does_nothing_without(up, nightly, monkeypatch):
    from mlflow import MlflowClient

    from sonosynth.infra.storage import open_storage

    first, quiet, new = (nightly[n][0].stdout for n in ("first", "nothing new", "new data"))
    assert "ran 9 stages" in first and "skipped 0 already done" in first
    assert "ran 0 stages, skipped 9 already done" in quiet, quiet[-3000:]
    assert "ran 8 stages (real, lora, synthetic, sam_real, sam_synthetic, eval_real, eval_synthetic, promote)" \
        in new and "skipped 1 already done" in new, new[-3000:]  # the held-out set did not change

    env = up["env"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    versions = sorted(client.search_model_versions("name='sonosynth-sam'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    assert versions[0].tags["sonosynth.decision"] == "first"
    assert versions[1].tags["sonosynth.decision"] in ("promoted", "refused")
    assert versions[1].tags["sonosynth.compared_with"] == "1"
    exp = client.get_experiment_by_name("sonosynth-nightly")
    parents = client.search_runs([exp.experiment_id], "tags.`sonosynth.stage` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    sources = [r.data.params["source.real"] for r in parents]
    assert len(sources) == 2 and sources[0].endswith("(48 files)") and sources[1].endswith("(64 files)")

    use_stack_s3(env, monkeypatch)
    out = open_storage("s3://sonosynth/nightly")
    lineage = out.get_text("lineage.csv")
    assert "(64 files)" in lineage and not out.exists("_pipeline/lease.json")
    print(f"nightly: first {nightly['first'][1]:.0f} s, nothing new {nightly['nothing new'][1]:.0f} s, "
          f"new data {nightly['new data'][1]:.0f} s")


def test_stack_down_leaves_no_process_behind(up, work, train_job, generate_job, procs):
    state, folder = up["state"], up["folder"]
    assert stack.marked_processes(state["id"])
    t0 = time.monotonic()
    procs.cli(["stack", "down", "--dir", str(folder)], env=up["env"], cwd=work)
    assert stack.marked_processes(state["id"]) == []
    for entry in state["services"].values():
        assert not stack._is_ours(entry["pid"], state["id"])
    assert not (folder / "stack.json").exists() and not Path(state["ray_temp_dir"]).exists()
    assert (folder / "logs" / "ray-head.log").is_file()  # the logs stay
    status = procs.cli(["stack", "status", "--dir", str(folder)], env=up["env"], cwd=work, check=False)
    assert status.returncode == 1
    print(f"stack up {up['up_s']:.0f} s, train job {train_job[1]:.0f} s, generate job {generate_job[1]:.0f} s, "
          f"down {time.monotonic() - t0:.0f} s")
