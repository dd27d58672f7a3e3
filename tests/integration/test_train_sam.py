"""train-sam end to end: a tiny SAM on 2 real DeepSpeed ranks (local Ray, CPU), a real MLflow server.

One uninterrupted job on phantom data (tracked on the server) is the reference: its val Dice
must beat the untrained model's, and its registered model must load back from the server and
reproduce that Dice. A second job, started with the CLI, is killed (driver, Ray and workers)
after its first checkpoint and resumed from Python: it must end with the reference's weights.
Then the CLI runs the recipe on the real HC18 sample, and the evaluate stage scores the model
it exported.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration
RECIPE = "sam_tiny"
JOB = ["engine.progress=false", "engine.checkpoint_every=10"]


def args(*extra: str) -> list[str]:
    """``train-sam sam_tiny EXTRA`` with the test's engine settings."""
    return ["train-sam", RECIPE, "--no-progress", *extra, *(x for kv in JOB for x in ("--set", kv))]

def config(out: Path, dataset: Path, *overrides: str):
    from sonosynth.launch.recipes import resolve
    from sonosynth.trainers.sam.train import SamTrainConfig

    return resolve(SamTrainConfig, RECIPE, {"out": str(out), "data": {"sources": {"real": {"dataset": str(dataset)}}}},
                   [*JOB, *overrides])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "sam_finetuned.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-sam")


@pytest.fixture(scope="module")
def local_ray():
    """The jobs started from this process share one local Ray, shut down at the end."""
    import ray

    address = os.environ.pop("RAY_ADDRESS", None)
    yield
    ray.shutdown()
    if address is not None:
        os.environ["RAY_ADDRESS"] = address


@pytest.fixture(scope="module")
def phantom(work) -> Path:
    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.infra.config import build

    out = work / "phantom"
    report = run_ingest(build(IngestConfig, {"out": str(out), "splits": {"val": 0.25, "test": 0.1}, "cohort": {
        "name": "phantom", "phantom": {"num": 40, "height": 96, "width": 96, "planes": ["brain"], "seed": 0}}}),
        progress=False)
    assert report.ingested == 40
    return out


@pytest.fixture(scope="module")
def reference(work, phantom, mlflow_url, local_ray) -> tuple[Path, dict]:
    """One uninterrupted job, tracked on the real MLflow server."""
    from sonosynth.trainers.launcher import train

    out = work / "reference"
    summary = train(config(out, phantom, f"tracking.uri={mlflow_url}"))
    return out, summary


def test_validation_dice_rises_above_the_untrained_model(reference, mlflow_url):
    from mlflow import MlflowClient

    out, s = reference
    assert s["workers"] == 2 and s["steps"] == 60 and s["task"] == "sam" and s["resumed_from_step"] == 0
    start, best = s["eval_start"]["val/dice"], s["best"]
    assert best["metric"] == "val/dice" and best["value"] > start + 0.1, (start, best)
    assert s["eval_end"]["val/loss"] < s["eval_start"]["val/loss"]
    lineage = s["lineage"]
    assert lineage["mode"] == "decoder" and lineage["cached_embeddings"] is True
    assert lineage["sources"]["real"]["examples"] == s["examples"] and lineage["val"]["split"] == "val"
    assert lineage["training"]["exported_step"] == best["step"]
    run = MlflowClient(mlflow_url).get_run(s["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["mode"] == "decoder"
    history = MlflowClient(mlflow_url).get_metric_history(run.info.run_id, "val/dice")
    assert [m.step for m in history] == list(range(0, 61, 10))
    assert "train/dice" in run.data.metrics and run.data.params["data.examples.real"] == str(s["examples"])


def test_registered_model_loads_back_from_the_server_and_predicts(reference, phantom, mlflow_url, work):
    from mlflow import MlflowClient

    from sonosynth.infra.storage import open_storage
    from sonosynth.trainers.sam import load_sam_model
    from sonosynth.trainers.sam.models import predict_masks, sam_forward
    from sonosynth.trainers.sam.module import batch_dice
    from sonosynth.trainers.sam.train import SamTask
    from sonosynth.trainers.task import WorkerContext

    out, s = reference
    assert s["mlflow"]["registered_model"] == "sonosynth-sam"
    client = MlflowClient(mlflow_url)
    version = client.get_model_version("sonosynth-sam", s["mlflow"]["version"])
    assert version.run_id == s["mlflow"]["run_id"]
    client.set_registered_model_alias("sonosynth-sam", "champion", version.version)
    sam = load_sam_model("models:/sonosynth-sam@champion", tracking_uri=mlflow_url)
    by_version = load_sam_model(f"models:/sonosynth-sam/{version.version}", tracking_uri=mlflow_url)
    for key, value in weights(out / "model").items():
        assert torch.equal(sam.state_dict()[key], value) and torch.equal(by_version.state_dict()[key], value), key

    # It reproduces the Dice its checkpoint was chosen with, on the same validation examples.
    cfg = config(work / "val-check", phantom, "tracking.enabled=false")
    task = SamTask(cfg, WorkerContext(0, 1, 0, torch.device("cpu"), open_storage(cfg.out)))
    val = task.eval_dataset()
    batch = torch.utils.data.default_collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        dice = batch_dice(sam_forward(sam, None, batch["box"], image_embeddings=batch["embedding"]), batch["target"])
    assert dice.mean().item() == pytest.approx(s["best"]["value"], abs=1e-5)

    # and predicts full-size masks from box prompts
    _, image, mask = val.raw(0)
    box = np.argwhere(mask)[:, ::-1]
    masks = predict_masks(sam, image, np.concatenate([box.min(0), box.max(0)])[None].astype(np.float32))
    assert masks.shape == (1, *image.shape) and masks[0].any()


def test_killed_job_resumes_to_the_same_weights(reference, phantom, work, local_ray, procs):
    from sonosynth.trainers.launcher import train

    ref_out, ref = reference
    out = work / "killed"
    proc = procs.start(args("--dataset", str(phantom), "--out", str(out), "--set", "tracking.enabled=false"),
                       cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        procs.wait_until(procs.checkpoint(out, 10).exists, proc, timeout=300, what="train-sam, before step 10")
    finally:
        procs.kill_tree(proc)
    assert not (out / "summary.json").exists(), "the job finished before it was killed"

    s = train(config(out, phantom, "tracking.enabled=false"))  # the same job, from Python this time
    assert s["resumed_from_step"] >= 10
    assert s["best"] == ref["best"] and s["eval_end"] == pytest.approx(ref["eval_end"], abs=1e-6)
    a, b = weights(ref_out / "model"), weights(out / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_recipe_runs_end_to_end_on_the_real_hc18_sample(shared_data, work, procs):
    """hc18_sample (800x540 outline annotations, filled by ingest) -> the train-sam CLI -> evaluate."""
    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.infra.config import build
    from sonosynth.launch.evaluate.segmentation import EvaluateConfig, run

    hc18 = work / "hc18"
    cohort = {"name": "hc18", "src": str(shared_data / "hc18_sample")}
    run_ingest(build(IngestConfig, {"out": str(hc18), "cohort": cohort, "splits": {"val": 0.2, "test": 0.2}}),
               progress=False)
    out = work / "sam-hc18"
    proc = procs.cli(args("--dataset", str(hc18), "--out", str(out), "--set", "tracking.enabled=false",
                          "--set", "data.augment.preset=weak", "--set", "engine.max_steps=20"), cwd=work)
    assert "val/dice" in proc.stdout and "(exported)" in proc.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 20 and s["eval_examples"] > 0 and s["best"]["value"] > 0
    assert s["lineage"]["augment"] == "weak" and s["lineage"]["cached_embeddings"] is False
    report = run(build(EvaluateConfig, {"dataset": str(hc18), "model": str(out / "model"), "out": str(work / "eval"),
                                        "box_draws": 2, "progress": False, "tracking": {"enabled": False}}))
    assert report.failed is None and report.figures["n_images"] > 0
    assert 0 <= report.figures["dice_mean"] <= 1 and report.figures["by_cohort"]["hc18"]["n_images"] > 0
    assert json.loads((work / "eval" / "summary.json").read_text())["model"] == str(out / "model")
