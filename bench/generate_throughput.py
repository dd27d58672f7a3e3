"""Generation throughput, all figures from the same run on the same tiny model. Prints JSON.

(a) end-to-end samples/s of the generate job (sampler actors, QC, PNG encoding, tar writing,
    publishing, completion records) divided by the pure denoising throughput of the same
    sampler called in a loop without any I/O, both with 1 worker and 1 thread (target >= 0.9);
(b) samples/s with 2 workers vs 1 (one thread each);
(c) samples/s of the generate job vs the paper's approach: a Python loop calling the
    pipeline one image at a time with UniPC, 30 steps (same threads in total).

QC is recorded but not enforced here (qc.enforce=false), so every image is a sample and the
rates compare like with like. Model loading and Ray start are excluded from the job's rate
(it is measured from the first sample started to the last shard published) and reported apart.

    .venv/bin/python bench/generate_throughput.py [--num 192] [--resolution 64] [--steps 25]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def make_lora(folder: Path, resolution: int) -> Path:
    from sonosynth.trainers.diffusion.lora import write_random_lora
    from sonosynth.trainers.diffusion.models import DiffusionModelConfig

    return write_random_lora(folder, DiffusionModelConfig(), rank=8, resolution=resolution)


def job(lora: Path, out: Path, args, workers: int) -> dict:
    from sonosynth.infra.config import build
    from sonosynth.launch.generate.config import GenerateConfig
    from sonosynth.launch.generate.driver import run_generate

    cfg = build(GenerateConfig, {
        "out": str(out), "num_samples": args.num, "shard_size": args.shard_size, "workers": workers,
        "cpus_per_worker": 1, "sampler": {"lora": str(lora), "steps": args.steps, "batch_size": args.batch,
                                          "resolution": args.resolution},
        "qc": {"enforce": False}, "tracking": {"enabled": False}})
    t0 = time.perf_counter()
    report = run_generate(cfg, progress=False)
    report["wall_s"] = time.perf_counter() - t0
    return report


def pure_loop(lora: Path, args) -> float:
    from sonosynth.launch.generate.config import sample_seed
    from sonosynth.trainers.diffusion.sampler import Sampler, SamplerConfig, SampleSpec

    torch.set_num_threads(1)
    sampler = Sampler(SamplerConfig(lora=str(lora), steps=args.steps, batch_size=args.batch,
                                    resolution=args.resolution))
    specs = [SampleSpec(i, 0, sample_seed(0, i, 0), "a photo of fetal head") for i in range(args.num)]
    sampler(specs[:args.batch])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, args.num, args.batch):
        sampler(specs[start:start + args.batch])
    return args.num / (time.perf_counter() - t0)


def paper_loop(lora: Path, args, threads: int) -> float:
    """Paper A's generation: pipeline called per image, UniPC 30 steps, LoRA at scale 0.9."""
    from diffusers import UniPCMultistepScheduler

    from sonosynth.trainers.diffusion.lora import WEIGHTS_NAME
    from sonosynth.trainers.diffusion.models import DiffusionModelConfig, build_pipeline

    torch.set_num_threads(threads)
    pipe = build_pipeline(DiffusionModelConfig())
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora), weight_name=WEIGHTS_NAME, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    n = max(8, args.num // 4)
    run = lambda: pipe("a photo of fetal head", height=args.resolution, width=args.resolution,  # noqa: E731
                       num_inference_steps=30, guidance_scale=7.5, cross_attention_kwargs={"scale": 0.9}).images
    run()
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=192, help="samples per measurement")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps of the sampler")
    ap.add_argument("--batch", type=int, default=8, help="sampler batch size")
    ap.add_argument("--shard-size", type=int, default=16)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}})
    with tempfile.TemporaryDirectory() as tmp:
        lora = make_lora(Path(tmp) / "lora", args.resolution)
        pure = pure_loop(lora, args)
        one = job(lora, Path(tmp) / "w1", args, workers=1)
        two = job(lora, Path(tmp) / "w2", args, workers=2)
        paper = paper_loop(lora, args, threads=2)
    best = max(one["steady_samples_per_s"], two["steady_samples_per_s"])
    print(json.dumps({
        "benchmark": "generate_throughput", "model": "tiny", "device": "cuda" if torch.cuda.is_available() else "cpu",
        "resolution": args.resolution, "steps": args.steps, "batch": args.batch, "num_samples": args.num,
        "a_pure_denoise_samples_per_s_1_thread": round(pure, 3),
        "a_generate_samples_per_s_1_worker": round(one["steady_samples_per_s"], 3),
        "a_ratio_generate_vs_pure": round(one["steady_samples_per_s"] / pure, 3),
        "b_generate_samples_per_s_2_workers": round(two["steady_samples_per_s"], 3),
        "b_ratio_2_vs_1_workers": round(two["steady_samples_per_s"] / one["steady_samples_per_s"], 3),
        "c_paper_loop_samples_per_s_unipc30_batch1_2_threads": round(paper, 3),
        "c_ratio_generate_vs_paper_loop": round(best / paper, 3),
        "startup_s": {"1_worker": round(one["wall_s"] - one["sampling_seconds"], 1),
                      "2_workers": round(two["wall_s"] - two["sampling_seconds"], 1)},
    }, indent=1))


if __name__ == "__main__":
    main()
