"""train-controlnet end to end: the CLI, a real local Ray, 2 DeepSpeed ranks on CPU, a real MLflow server.

Three job launches in all: one uninterrupted job (tracked and registered over HTTP), and one
killed after its first checkpoint and run again with the same command, which must resume and
end with the uninterrupted job's weights. The exported folder is then loaded with plain
diffusers and must draw what the trained module draws.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
STEPS, FIRST_CHECKPOINT = 20, 5
JOB = ["--set", f"engine.max_steps={STEPS}", "--set", f"engine.checkpoint_every={FIRST_CHECKPOINT}",
       "--set", "engine.log_every=5", "--set", "eval_examples=2", "--set", "preview.num=2",
       "--set", "preview.steps=4", "--no-progress"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-controlnet")


@pytest.fixture(scope="module")
def data(work, make_phantom_dataset) -> Path:
    return make_phantom_dataset(work / "phantom", 8, ["brain"], size=64)


def command(out: Path, data: Path, *extra: str) -> list[str]:
    return ["train-controlnet", "controlnet_tiny", "--out", str(out), "--dataset", str(data), *extra, *JOB]


@pytest.fixture(scope="module")
def reference(work, data, mlflow_url, procs) -> tuple[Path, str]:
    """The uninterrupted job, tracked on the MLflow server: (out, its stdout)."""
    out = work / "reference"
    proc = procs.cli(command(out, data, "--set", f"tracking.uri={mlflow_url}"), cwd=work)
    return out, proc.stdout


@pytest.fixture(scope="module")
def resumed(work, data, procs) -> Path:
    """The same job killed (with its Ray and workers) after its first checkpoint, then run again."""
    out = work / "killed"
    args = command(out, data, "--set", "tracking.enabled=false")
    with open(work / "killed.log", "w") as log:
        proc = procs.start(args, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        try:
            procs.wait_until(procs.checkpoint(out, FIRST_CHECKPOINT).exists, proc, timeout=400,
                             what=f"train-controlnet, before its step-{FIRST_CHECKPOINT} checkpoint")
        finally:
            procs.kill_tree(proc)
    assert not (out / "summary.json").exists(), "the job finished before it was killed"
    procs.cli(args, cwd=work)
    return out


def test_trains_on_two_ranks_and_registers_the_controlnet(reference, mlflow_url):
    import mlflow
    from mlflow import MlflowClient

    from sonosynth.trainers.controlnet.conditioning import CONDITIONING, LINEAGE_KIND

    out, stdout = reference
    s = summary(out)
    assert (s["task"], s["workers"], s["steps"], s["examples"], s["resumed_from_step"]) == ("controlnet", 2, STEPS,
                                                                                           8, 0)
    assert np.isfinite(s["eval_end"]["eval/loss"]) and s["eval_end"]["eval/loss"] != s["eval_start"]["eval/loss"]
    assert "registered: sonosynth-controlnet" in stdout
    lineage = json.loads((out / "model" / "lineage.json").read_text())
    assert (lineage["kind"], lineage["conditioning"], lineage["resolution"], lineage["lora"]) == (
        LINEAGE_KIND, CONDITIONING, 64, None)
    assert lineage["base_model"].startswith("tiny-") and lineage["prompt"].startswith("a photo of standard")
    weights = (out / "model" / WEIGHTS).read_bytes()
    assert lineage["weights_sha256"] == hashlib.sha256(weights).hexdigest()

    client = MlflowClient(mlflow_url)
    run = client.get_run(s["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["engine.workers"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "inputs.png", "lineage.json", "model", "previews", "summary.json"} <= artifacts
    version = client.get_model_version("sonosynth-controlnet", s["mlflow"]["version"])
    assert version.run_id == run.info.run_id
    registered = Path(mlflow.artifacts.download_artifacts(version.source, tracking_uri=mlflow_url))
    assert (registered / WEIGHTS).read_bytes() == weights and (registered / "config.json").is_file()


def test_killed_job_resumes_to_the_weights_of_the_uninterrupted_one(reference, resumed):
    s, ref = summary(resumed), summary(reference[0])
    assert s["resumed_from_step"] >= FIRST_CHECKPOINT and s["steps"] == STEPS
    a, b = load_file(reference[0] / "model" / WEIGHTS), load_file(resumed / "model" / WEIGHTS)
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert s["eval_end"] == ref["eval_end"]
    assert s["lineage"]["weights_sha256"] == ref["lineage"]["weights_sha256"]


def test_export_loads_in_plain_diffusers_and_draws_what_the_trained_module_draws(reference):
    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from sonosynth.infra.config import build
    from sonosynth.trainers.controlnet.models import ControlNetConfig, build_controlnet
    from sonosynth.trainers.diffusion.models import DiffusionModelConfig, build_components

    out = reference[0]
    cfg = yaml.safe_load((out / "model" / "config.yaml").read_text())
    parts = build_components(build(DiffusionModelConfig, cfg["model"]))
    loaded = ControlNetModel.from_pretrained(out / "model")

    # The exported weights are the last checkpoint's, and a ControlNet made the way the trainer makes
    # it, given those weights, is the trained module.
    checkpoint = torch.load(out / "checkpoints" / f"step-{STEPS:08d}" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=True)["module"]
    exported = loaded.state_dict()
    assert {f"controlnet.{k}" for k in exported} == set(checkpoint)
    for key, value in exported.items():
        assert torch.equal(value, checkpoint[f"controlnet.{key}"]), key
    trained = build_controlnet(parts.unet, build(ControlNetConfig, cfg["controlnet"]), cfg["engine"]["seed"])
    trained.load_state_dict({k.removeprefix("controlnet."): v for k, v in checkpoint.items()})

    # The masks the preview drew for, read back from its sheet: [mask, image, mask, image] at 64 px.
    sheet = np.asarray(Image.open(out / "previews" / "final.png"))
    tiles = [sheet[:, i * 64:(i + 1) * 64] for i in range(4)]
    masks = [tiles[0][..., 0] > 127, tiles[2][..., 0] > 127]
    assert all(0 < m.mean() < 1 for m in masks)

    def draw(controlnet) -> list[np.ndarray]:
        pipe = StableDiffusionControlNetPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            controlnet=controlnet, scheduler=DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        ids = parts.tokenizer([cfg["data"]["prompt"], ""], padding="max_length", return_tensors="pt",
                              max_length=parts.tokenizer.model_max_length).input_ids
        with torch.no_grad():
            emb = parts.text_encoder(ids).last_hidden_state
        condition = [np.repeat(m.astype(np.float32)[..., None], 3, axis=2) for m in masks]
        images = pipe(prompt_embeds=emb[:1].expand(2, -1, -1), negative_prompt_embeds=emb[1:].expand(2, -1, -1),
                      image=condition, height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]

    from_folder, from_module = draw(loaded), draw(trained)
    for a, b in zip(from_folder, from_module):
        assert np.array_equal(a, b)
    # ... and what the job's own preview drew in its worker, to within rounding of another thread count.
    for drawn, tile in zip(from_folder, (tiles[1], tiles[3])):
        assert np.abs(drawn.astype(int) - tile.astype(int)).max() <= 1
    assert np.abs(from_folder[0].astype(int) - from_folder[1].astype(int)).max() > 0
