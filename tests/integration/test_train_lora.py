"""train-lora end to end: the CLI, a real local Ray, 2 DeepSpeed ranks on CPU, real MLflow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
STEPS = ["--set", "engine.max_steps=40", "--set", "engine.checkpoint_every=10", "--set", "preview.num=2"]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-lora")


@pytest.fixture(scope="module")
def joint_data(work, make_phantom_dataset) -> Path:
    return make_phantom_dataset(work / "phantom", 24, ["brain"])


@pytest.fixture(scope="module")
def joint_run(work, joint_data, procs) -> tuple[Path, str, str]:
    """One uninterrupted joint-mode job: 2 ranks, 40 steps, local SQLite MLflow store: (out, uri, its console:
    stdout and stderr, not a terminal)."""
    out, uri = work / "joint", f"sqlite:///{work / 'mlruns.db'}"
    proc = procs.cli(["train-lora", "lora_joint_tiny", "--out", str(out), "--dataset", str(joint_data),
                "--set", f"tracking.uri={uri}", *STEPS], cwd=work)
    return out, uri, proc.stdout + proc.stderr


def test_joint_mode_loss_falls_on_two_ranks(joint_run):
    out, _, stdout = joint_run
    s = summary(out)
    assert s["workers"] == 2 and s["steps"] == 40 and s["resumed_from_step"] == 0
    assert s["eval_end"]["eval/loss"] < s["eval_start"]["eval/loss"] - 0.01, s
    assert "eval/loss" in stdout and "registered: sonosynth-lora" in stdout


def test_the_console_shows_sonosynth_lines_and_the_logs_folder_holds_the_rest(joint_run):
    out, _, console = joint_run
    for noise in ("RayTrainWorker", "TrainController", "FutureWarning", "core_worker", "DeepSpeed", "(pid=",
                  "Token authentication", "\r", "\x1b["):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    assert f"logs: {out}/logs" in console
    # the progress bar off a terminal: plain lines, the last one at the end of the job
    assert "train-lora: 40/40 step (100%) in " in console
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert "driver.log" in logs and "Token authentication" in logs["driver.log"]
    workers = [text for name, text in logs.items() if name.startswith("RayTrainWorker-")]
    assert len(workers) >= 1 and any("Setting up process group" in text for text in workers)
    assert any(name.startswith("TrainController-") for name in logs)
    # DeepSpeed's ZeRO gather uses the collective torch 2.13 keeps (engine.use_current_all_gather)
    assert not any("FutureWarning" in text for text in logs.values())


def test_rank0_alone_owns_one_mlflow_run(joint_run):
    out, uri, _ = joint_run
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("sonosynth-train-lora")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "each rank must not open its own run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["engine.workers"] == "2" and run.data.params["lora.rank"] == "8"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(5, 41, 5))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "inputs.png", "model", "previews", "summary.json"} <= artifacts
    versions = client.search_model_versions("name='sonosynth-lora'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert json.loads((out / "tracking.json").read_text())["run_id"] == run.info.run_id


def test_saved_lora_loads_into_pipeline_and_changes_output(joint_run):
    from sonosynth.infra.config import build
    from sonosynth.trainers.diffusion.models import DiffusionModelConfig, build_pipeline

    out, _, _ = joint_run
    model_cfg = build(DiffusionModelConfig, json.loads(json.dumps(
        __import__("yaml").safe_load((out / "model" / "config.yaml").read_text())["model"])))

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a photo of standard maternal fetal ultrasound planes, fetal head", height=64, width=64,
                    num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images

    pipe = build_pipeline(model_cfg)
    before = sample(pipe)
    pipe.load_lora_weights(str(out / "model"))
    after = sample(pipe)
    assert np.abs(after - before).max() > 1e-3
    keys = load_file(out / "model" / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("unet.") for k in keys)


def test_rerun_of_finished_job_trains_nothing(joint_run, joint_data, procs):
    out, uri, _ = joint_run
    proc = procs.cli(["train-lora", "lora_joint_tiny", "--out", str(out), "--dataset", str(joint_data),
                      "--set", f"tracking.uri={uri}", *STEPS], cwd=out.parent)
    assert "already finished" in proc.stdout


def test_class_mode_on_s3_tracked_on_a_real_server(work, mlflow_url, make_phantom_dataset, s3_bucket, procs):
    """Class mode with a text-encoder LoRA; checkpoints and model on S3 (moto_server), MLflow over HTTP."""
    from sonosynth.infra.storage import open_storage

    data = make_phantom_dataset(work / "planes", 32, ["brain", "abdomen", "femur", "thorax"])
    out = f"s3://{s3_bucket}/lora/class"
    proc = procs.cli(["train-lora", "lora_class_tiny", "--out", out, "--dataset", str(data),
                      "--set", f"tracking.uri={mlflow_url}", *STEPS], cwd=work)
    storage = open_storage(out)
    s = json.loads(storage.get_text("summary.json"))
    assert s["eval_end"]["eval/loss"] < s["eval_start"]["eval/loss"] - 0.01, s
    assert sorted(s["lineage"]["prompts"]) == ["a photo of fetal abdomen", "a photo of fetal brain",
                                               "a photo of fetal femur", "a photo of fetal thorax"]
    assert {k.split("/")[1] for k in storage.list("checkpoints/")} == {"step-00000030", "step-00000040"}
    weights = storage.get_bytes("model/pytorch_lora_weights.safetensors")
    (work / "class.safetensors").write_bytes(weights)
    keys = load_file(work / "class.safetensors").keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    client = mlflow_client(mlflow_url)
    run = client.get_run(s["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["data.mode"] == "class"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 8
    version = client.get_model_version("sonosynth-lora", s["mlflow"]["version"])
    assert version.run_id == run.info.run_id
    local = Path(__import__("mlflow").artifacts.download_artifacts(version.source, tracking_uri=mlflow_url))
    assert (local / "pytorch_lora_weights.safetensors").read_bytes() == weights
    assert mlflow_url in proc.stdout


def test_killed_workers_are_restarted_by_ray_train_and_resume(work, joint_data, joint_run, procs):
    import psutil

    reference, _, _ = joint_run
    out = work / "worker-killed"
    args = ["train-lora", "lora_joint_tiny", "--out", str(out), "--dataset", str(joint_data),
            "--set", f"tracking.uri=sqlite:///{work / 'worker-killed.db'}", "--set", "engine.max_failures=1",
            *STEPS]
    proc = procs.start(args, cwd=work, stderr=subprocess.STDOUT)
    try:
        procs.wait_until(procs.checkpoint(out, 10).exists, proc, timeout=400, what="train-lora, before step 10")
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "ray::RayTrainWorker" in " ".join(p.cmdline())]
        assert len(workers) == 2
        for p in workers:
            p.kill()
        output, _ = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            procs.kill_tree(proc)
    assert proc.returncode == 0, output[-4000:]
    s = summary(out)
    assert s["resumed_from_step"] >= 10
    a = load_file(reference / "model" / "pytorch_lora_weights.safetensors")
    b = load_file(out / "model" / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
