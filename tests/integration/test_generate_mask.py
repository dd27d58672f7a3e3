"""generate in mask mode end to end: the CLI on a real local Ray with two sampler actors, a tiny
ControlNet folder as train-controlnet exports it, a shape model fitted at plan time, a tiny SAM as
the QC segmenter; resume; and the sampler against plain diffusers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sonosynth.datasets.reader import DatasetReader
from sonosynth.datasets.shape_model import ShapeModel, render
from sonosynth.launch.generate.config import mask_seed, sample_seed

pytestmark = pytest.mark.integration
N, SIZE, PROMPT = 8, 64, "a fetal head, ultrasound"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate-mask")


@pytest.fixture(scope="module")
def controlnet(work) -> Path:
    """A ControlNet folder in train-controlnet's format: the tiny base UNet's ControlNet, safetensors +
    lineage.json. Untrained, its zero convolutions would make the mask irrelevant and the default
    init of its mask encoder all but flattens the mask: both are drawn at random with a He-scaled
    encoder, so that the mask steers the image."""
    import math

    import torch
    from diffusers import ControlNetModel

    from sonosynth.trainers.diffusion.models import DiffusionModelConfig, build_components

    model = DiffusionModelConfig()
    net = ControlNetModel.from_unet(build_components(model).unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in net.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator)
                                  * math.sqrt(2 / conv.weight[0].numel()))
                conv.bias.zero_()
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    folder = work / "controlnet"
    net.save_pretrained(str(folder), safe_serialization=True)
    (folder / "lineage.json").write_text(json.dumps({
        "kind": "controlnet", "base_model": model.identity(), "resolution": SIZE, "prompt": PROMPT, "clip_skip": 1,
        "lora": None, "lora_sha256": None, "resize": "pad"}))
    return folder


@pytest.fixture(scope="module")
def segmenter(work) -> Path:
    """A tiny random SAM in train-sam's model folder format (mode full)."""
    import torch
    import yaml

    from sonosynth.trainers.sam.models import FORMAT, WEIGHTS_FILE, SamModelConfig, build_sam

    folder = work / "sam"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "tiny", "seed": 0}}))
    torch.save({"format": FORMAT, "mode": "full", "state_dict": build_sam(SamModelConfig()).state_dict()},
               folder / WEIGHTS_FILE)
    return folder


def args(out: Path, controlnet: Path, masks: Path, segmenter: Path) -> list[str]:
    return ["--out", str(out), "--controlnet", str(controlnet), "--num-samples", str(N), "--set", "shard_size=2",
            "--set", f"masks.dataset={masks}", "--set", f"qc.segmenter={segmenter}",
            "--set", "qc.min_label_fidelity=0", "--set", "tracking.enabled=false", "--no-progress"]


@pytest.fixture(scope="module")
def reference(work, controlnet, segmenter, make_phantom_dataset, procs):
    masks = make_phantom_dataset(work / "phantom", 12, ["brain"], size=SIZE)
    out = work / "reference"
    proc = procs.cli(["generate", "generate_mask_tiny", *args(out, controlnet, masks, segmenter), "--workers", "2"],
                     cwd=work)
    return out, masks, proc.stdout


def test_exactly_n_pairs_whose_masks_are_the_conditioning_masks(reference, controlnet):
    out, _, stdout = reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"] == N and summary["mode"] == "mask" and f"generated {N}/{N} samples" in stdout
    model = ShapeModel.load(out / "shape_model.json")  # fitted on the phantom masks at plan time
    assert model.n_masks == 12
    cn_sha = hashlib.sha256((controlnet / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    samples = list(DatasetReader(str(out), distributed=False).samples())
    assert sorted(s.meta["index"] for s in samples) == list(range(N))
    for s in samples:
        i, attempt = s.meta["index"], s.meta["attempt"]
        shape = model.sample(np.random.default_rng(mask_seed(0, i, attempt)), 1)[0]
        assert s.mask.dtype == np.uint8 and (s.mask == render(shape, SIZE, SIZE)).all(), s.key
        assert s.image.shape == (SIZE, SIZE) and s.meta["seed"] == sample_seed(0, i, attempt)
        assert s.meta["controlnet_sha256"] == cn_sha and s.meta["prompt"] == PROMPT and s.meta["mode"] == "mask"
        assert s.meta["mask_source"] == {"source": "shape_model", "sha256": model.sha256(), "path": "shape_model.json",
                                         "fitted_on": model.source}
        assert s.meta["mask_shape"] == shape.to_dict() and 0 <= s.meta["qc_label_fidelity"] <= 1
    import pyarrow.parquet as pq

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == N and all(r["has_mask"] and r["qc_ellipse_a"] > 0 for r in manifest)


def test_rerunning_the_same_command_is_a_no_op(reference, controlnet, segmenter, fingerprint):
    from sonosynth.launch.generate.config import GenerateConfig
    from sonosynth.launch.generate.driver import run_generate
    from sonosynth.launch.recipes import resolve

    out, masks, _ = reference
    before = fingerprint(out)
    tars = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    cli = args(out, controlnet, masks, segmenter)
    overrides = [v for flag, v in zip(cli, cli[1:]) if flag == "--set"]
    cfg = resolve(GenerateConfig, "generate_mask_tiny", {}, [
        *overrides, f"out={out}", f"sampler.controlnet={controlnet}", f"num_samples={N}", "progress=false"])
    report = run_generate(cfg)  # every shard has its record: nothing to sample, no Ray started
    assert report["shards_reused"] == N // 2 and report["accepted"] == N and report["seconds"] == 0.0
    assert fingerprint(out) == before
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")} == tars


def test_a_lost_shard_and_record_are_redrawn_to_the_same_samples(work, reference, controlnet, segmenter, procs,
                                                                 fingerprint):
    out, masks, _ = reference
    resumed = work / "resumed"
    shutil.copytree(out, resumed)
    record = sorted((resumed / "_done").rglob("*.json"))[1]
    shard = json.loads(record.read_text())["shard"]
    record.unlink()
    (resumed / shard).unlink()
    proc = procs.cli(["generate", "generate_mask_tiny", *args(resumed, controlnet, masks, segmenter)], cwd=work)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["shards_reused"] == N // 2 - 1 and summary["accepted"] == N, proc.stdout
    assert fingerprint(resumed) == fingerprint(out)


def test_the_sampler_draws_what_plain_diffusers_draws_for_the_same_mask(controlnet):
    import torch
    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    from sonosynth.datasets.shape_model import HeadShape
    from sonosynth.trainers.diffusion.models import DiffusionModelConfig, build_components
    from sonosynth.trainers.diffusion.sampler import Sampler, SamplerConfig, SampleSpec

    sampler = Sampler(SamplerConfig(controlnet=str(controlnet), steps=4, scheduler="dpm++", batch_size=2),
                      device="cpu")
    assert sampler.resolution == SIZE  # from the ControlNet's lineage.json
    masks = [render(HeadShape(0.5, 0.5, 0.3, 0.2, 0.4), SIZE, SIZE), render(HeadShape(0.3, 0.6, 0.2, 0.15, 2.0),
                                                                            SIZE, SIZE)]
    ours = sampler([SampleSpec(i, 0, 11 + i, PROMPT, mask=m) for i, m in enumerate(masks)])

    parts = build_components(DiffusionModelConfig())  # plain diffusers from here on
    pipe = StableDiffusionControlNetPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        controlnet=ControlNetModel.from_pretrained(str(controlnet)),
        scheduler=DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config, algorithm_type="dpmsolver++"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for i, mask in enumerate(masks):
        condition = np.repeat((mask[..., None] / 255.0).astype(np.float32), 3, axis=2)
        image = pipe(PROMPT, image=[condition], height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(11 + i), output_type="np").images[0]
        plain = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        # ours ran as one batch of two: fp32 sums in another order flip a rounding at most (measured: 1)
        assert np.abs(plain.astype(int) - ours[i].astype(int)).max() <= 1
    # the mask steers the image: the same seed and prompt with another mask draw another image
    other = sampler([SampleSpec(0, 0, 11, PROMPT, mask=masks[1])])[0]
    assert np.abs(other.astype(int) - ours[0].astype(int)).mean() > 1
    with pytest.raises(ValueError, match="needs each spec's conditioning mask at 64x64"):
        sampler([SampleSpec(0, 0, 11, PROMPT)])
