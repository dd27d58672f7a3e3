"""train-classifier end to end: 2 real ranks on a local Ray (CPU, gloo), a real MLflow server.

A tiny classifier learns the 4 phantom planes far above chance, its checkpoint chosen on the
validation macro F1 (per-class counts summed over both ranks, then ``finalize_metrics``); the
model registered on the MLflow server loads back through ``load_classifier(models:/...)`` and
predicts what the exported folder predicts; a job killed after a checkpoint resumes to the
exported weights and the best evaluation of the uninterrupted job.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
PLANES = ["abdomen", "brain", "femur", "thorax"]
STEPS = 150
DRIVER = ("import json, sys\n"
          "from sonosynth.infra.config import build\n"
          "from sonosynth.trainers.classifier.train import ClassifierTrainConfig\n"
          "from sonosynth.trainers.launcher import train\n"
          "print(json.dumps(train(build(ClassifierTrainConfig, json.loads(sys.argv[1])))), flush=True)\n")


def job(out: Path, dataset: Path, **tracking) -> dict:
    return {
        "out": str(out), "data": {"sources": {"real": {"dataset": str(dataset)}}},
        "model": {"backbone": "small_resnet", "image_size": 48},
        "augment": {"crop_scale": [0.5, 1.0], "max_side": 96},
        "engine": {"workers": 2, "max_steps": STEPS, "micro_batch": 8, "eval_every": 25, "checkpoint_every": 50,
                   "log_every": 25, "loader_workers": 0, "best_metric": "val/f1_macro", "progress": False},
        "optim": {"lr": 0.003, "schedule": "cosine", "warmup_steps": 5},
        "tracking": tracking or {"enabled": False},
    }


def command(cfg: dict) -> list[str]:
    return [sys.executable, "-c", DRIVER, json.dumps(cfg)]


def run_job(cfg: dict, cwd: Path, procs) -> dict:
    proc = subprocess.run(command(cfg), cwd=cwd, env=procs.env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((Path(cfg["out"]) / "summary.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-classifier")


@pytest.fixture(scope="module")
def planes_data(work, make_phantom_dataset) -> Path:
    return make_phantom_dataset(work / "phantom", 200, PLANES, size=64)


@pytest.fixture(scope="module")
def reference(work, planes_data, mlflow_url, procs) -> tuple[dict, dict]:
    cfg = job(work / "ref", planes_data, uri=mlflow_url)
    return cfg, run_job(cfg, work, procs)


def test_two_ranks_learn_the_phantom_planes(reference):
    cfg, s = reference
    assert s["workers"] == 2 and s["steps"] == STEPS and s["task"] == "classifier"
    best = s["best"]
    assert best["metric"] == "val/f1_macro" and best["metrics"]["val/acc"] >= 0.8, best  # chance: 0.25
    assert s["eval_start"]["val/acc"] < 0.6
    per_class = [best["metrics"][f"val/f1/{p}"] for p in PLANES if f"val/f1/{p}" in best["metrics"]]
    assert len(per_class) == 4 and min(per_class) > 0.3, best["metrics"]
    assert best["value"] == pytest.approx(sum(per_class) / 4)  # every class is in the phantom val split
    assert not any(name.startswith("val/counts/") for name in best["metrics"])
    data = s["lineage"]["data"]
    assert data["labels"] == PLANES and data["train_samples"] + data["val_samples"] < 200
    model = Path(cfg["out"]) / "model"
    assert {"classifier.json", "config.json", "model.safetensors", "preprocessor_config.json", "lineage.json",
            "config.yaml"} <= {p.name for p in model.iterdir()}


def test_registered_model_loads_from_the_mlflow_server_and_predicts(reference, planes_data, mlflow_url, work):
    from mlflow import MlflowClient

    from sonosynth.datasets.indexed import ShardDataset
    from sonosynth.infra.config import build
    from sonosynth.launch.evaluate.classification import run_classification
    from sonosynth.launch.evaluate.segmentation import EvaluateConfig
    from sonosynth.trainers.classifier import load_classifier

    cfg, s = reference
    ml = s["mlflow"]
    assert ml["registered_model"] == "sonosynth-classifier" and ml["version"]
    client = MlflowClient(mlflow_url)
    run = client.get_run(ml["run_id"])
    assert run.data.metrics["best/val/f1_macro"] == pytest.approx(s["best"]["value"])
    assert {"config.yaml", "lineage.json", "model", "summary.json", "data.json", "inputs.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}

    uri = f"models:/sonosynth-classifier/{ml['version']}"
    remote = load_classifier(uri, tracking_uri=mlflow_url)
    local = load_classifier(Path(cfg["out"]) / "model")
    assert remote.labels == local.labels == PLANES
    test = ShardDataset(str(planes_data), split="test")
    images = [test[i]["image"] for i in range(len(test))]
    truth = [test.meta(i)["plane"] for i in range(len(test))]
    probs = remote.predict_proba(images)
    np.testing.assert_allclose(probs, local.predict_proba(images), atol=1e-6)
    assert probs.shape == (len(test), 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.mean([p == t for p, t in zip(remote.predict(images), truth)]) >= 0.6  # unseen test split

    # The same model through the evaluate stage's classification path, read from the registry.
    report = run_classification(build(EvaluateConfig, {
        "dataset": str(planes_data), "split": "test", "model": uri, "out": str(work / "eval"),
        "tracking": {"uri": mlflow_url}, "progress": False}))
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert summary["n"] == len(test) and summary["accuracy"] == pytest.approx(
        np.mean([p == t for p, t in zip(remote.predict(images), truth)]))
    assert report.tracking["run_id"] and client.get_run(report.tracking["run_id"]).data.metrics["accuracy"] >= 0.6


def test_killed_job_resumes_to_the_uninterrupted_weights(work, planes_data, reference, procs):
    ref_cfg, ref = reference
    cfg = job(work / "killed", planes_data)
    out = Path(cfg["out"])
    proc = subprocess.Popen(command(cfg), cwd=work, env=procs.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        procs.wait_until(procs.checkpoint(out, 50).exists, proc, timeout=300, what="the classifier, before step 50")
    finally:
        procs.kill_tree(proc)
    assert not (out / "summary.json").exists(), "the job finished before it was killed"

    s = run_job(cfg, work, procs)
    assert s["resumed_from_step"] >= 50
    assert s["best"] == ref["best"]
    a = load_file(str(Path(ref_cfg["out"]) / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # weights and BatchNorm statistics
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
