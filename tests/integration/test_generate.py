"""generate end to end: the CLI, a real local Ray, sampler actors, shards, S3, MLflow."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import webdataset as wds


pytestmark = pytest.mark.integration
N = 24
BASE = ["--num-samples", str(N), "--set", "shard_size=4", "--workers", "2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def reference(work, tiny_lora, procs, fingerprint) -> tuple[Path, dict, str]:
    out = work / "reference"
    proc = procs.cli(["generate", "generate_tiny", "--out", str(out), "--lora", str(tiny_lora), *BASE,
                "--set", f"tracking.uri=sqlite:///{work / 'mlruns.db'}"], cwd=work)
    return out, fingerprint(str(out)), proc.stdout


def test_exactly_n_unique_samples_readable_by_webdataset_and_our_reader(reference):
    out, prints, stdout = reference
    summary = json.loads((out / "summary.json").read_text())
    assert len(prints) == N == summary["accepted"]
    assert sorted(int(k.rsplit("-", 1)[1]) for k in prints) == list(range(N))
    assert summary["rejected_by_reason"], "the tiny recipe's QC should reject (and redraw) some samples"
    assert 0 < summary["acceptance_rate"] < 1
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert len(tars) == N // 4
    records = list(wds.WebDataset(tars, shardshuffle=False).decode("l"))
    assert len(records) == N and {r["__key__"] for r in records} == set(prints)
    for record in records:  # every delivered sample passed QC and has its filled mask
        assert record["mask.png"].max() == 1.0 and record["meta.json"]["qc_reason"] is None  # "l": 0..1
    meta = records[0]["meta.json"]
    assert {"seed", "prompt", "scheduler", "steps", "lora_sha256", "base_model", "generation_run"} <= set(meta)
    assert meta["scheduler"] == "dpm++" and meta["source"] == "synthetic"
    assert (out / "samples_grid.png").stat().st_size > 1000
    assert "generated 24/24 samples" in stdout


def test_generation_is_tracked_in_mlflow(work, reference):
    from mlflow import MlflowClient

    out, _, _ = reference
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    run = client.get_run(json.loads((out / "summary.json").read_text())["mlflow"]["run_id"])
    assert run.data.metrics["accepted"] == N and 0 < run.data.metrics["acceptance_rate"] < 1
    assert "steady_samples_per_s" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts >= {"samples_grid.png", "config.yaml", "summary.json"}


def shard_done(out: Path):
    return lambda: (out / "_done").is_dir() and bool(list((out / "_done").glob("*.json")))


def test_a_killed_sampler_actor_still_ends_with_exactly_n(work, tiny_lora, reference, procs, fingerprint):
    import psutil

    out = work / "actor-killed"
    args = ["generate", "generate_tiny", "--out", str(out), "--lora", str(tiny_lora), *BASE,
            "--set", "tracking.enabled=false"]
    proc = procs.start(args, cwd=work, stderr=subprocess.STDOUT)
    try:
        procs.wait_until(shard_done(out), proc, timeout=300, what="generate, before its first shard")
        actors = [p for p in psutil.Process(proc.pid).children(recursive=True)
                  if "SamplerWorker" in " ".join(p.cmdline())]
        assert actors, "no sampler actor process found"
        actors[0].kill()
        output, _ = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            procs.kill_tree(proc)
    assert proc.returncode == 0, output[-4000:]
    assert fingerprint(str(out)) == reference[1]  # same run id, same samples, nothing twice


def test_an_interrupted_job_rerun_completes_without_duplicates(work, tiny_lora, reference, procs, fingerprint):
    out = work / "interrupted"
    args = ["generate", "generate_tiny", "--out", str(out), "--lora", str(tiny_lora), *BASE,
            "--set", "tracking.enabled=false"]
    proc = procs.start(args, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        procs.wait_until(shard_done(out), proc, timeout=300, what="generate, before its first shard")
    finally:
        procs.kill_tree(proc)
    assert not (out / "summary.json").exists(), "the job finished before it was killed"
    done = procs.cli(args, cwd=work)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_reused"] >= 1 and summary["accepted"] == N
    assert fingerprint(str(out)) == reference[1]
    assert "already complete" in done.stdout


def test_writes_to_s3_with_the_lora_from_the_mlflow_registry(work, tiny_lora, reference, s3_bucket,
                                                             moto_endpoint, mlflow_url, procs, fingerprint):
    from mlflow import MlflowClient

    from sonosynth.infra.tracking import Tracker, TrackingConfig

    tracker = Tracker(TrackingConfig(uri=mlflow_url), offline_dir=work / "off", experiment="lora-for-generate")
    tracker.start()
    tracker.log_artifact(tiny_lora, "model")
    version = tracker.register("model", "tiny-lora", alias="champion")
    tracker.close()
    assert version is not None
    out = f"s3://{s3_bucket}/synthetic/run1"
    procs.cli(["generate", "generate_tiny", "--out", out, "--lora", "models:/tiny-lora@champion", *BASE,
               "--set", f"tracking.uri={mlflow_url}"], cwd=work)
    assert fingerprint(out) == reference[1]  # same LoRA bytes -> same run id -> same samples
    client = MlflowClient(mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name("sonosynth-generate").experiment_id])
    assert any(r.data.params.get("out") == out and r.data.metrics.get("accepted") == N for r in runs)


def test_no_room_for_any_sampler_actor_stops_after_the_wait_naming_what_is_free(work, tiny_lora, procs):
    out = work / "no-room"
    proc = procs.cli(["generate", "generate_tiny", "--out", str(out), "--lora", str(tiny_lora), "--num-samples", "4",
                      "--workers", "1", "--set", "cpus_per_worker=512", "--set", "replacement_wait_s=3",
                      "--set", "tracking.enabled=false", "--no-progress"], cwd=work, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    [message] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "no sampler actor could start within replacement_wait_s=3 s" in message
    assert re.search(r"each actor needs 512 CPU and the cluster \(1 alive nodes\) has free [\d.]+ CPU, 0 GPU", message)
    assert "re-running" in message
