"""LoRA training throughput through the engine that ships: ``sonosynth.trainers.launcher.train``
(Ray Train workers, DeepSpeed ZeRO-2, ``LoraTask`` and the engine's DataLoader), with latents
cached once (the default) vs every example through the frozen VAE every step.

Both variants run in the same process on one local Ray, on the same phantom data, with the
same config otherwise, alternating for ``--repeats`` rounds (median kept). Each job's
steady-state rate comes from its summary.json (``perf``: steps after the first log window;
no evaluation, checkpoint or preview inside the timed steps), and so does its peak memory
(rank 0's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU). Prints one JSON line
per job, then a summary line with ``speedup_cached_latents``.

    .venv/bin/python bench/lora_train_throughput.py [--resolution 128] [--steps 60] [--workers 2] \\
        [--batch 2] [--rank 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

VARIANTS = {"cached_latents": True, "vae_every_step": False}


def job(variant: str, dataset: str, out: Path, args) -> dict:
    from sonosynth.infra.config import build
    from sonosynth.trainers.diffusion.train import LoraTrainConfig
    from sonosynth.trainers.launcher import train

    cfg = build(LoraTrainConfig, {
        "out": str(out), "data": {"dataset": dataset, "split": None, "resolution": args.resolution},
        "lora": {"rank": args.rank}, "cache": {"latents": VARIANTS[variant]}, "eval_examples": 0,
        "preview": {"num": 0}, "tracking": {"enabled": False},
        "engine": {"workers": args.workers, "micro_batch": args.batch, "max_steps": args.steps,
                   "log_every": args.log_every, "checkpoint_every": args.steps, "progress": False}})
    t0 = time.perf_counter()
    summary = train(cfg)
    perf = summary["perf"]
    return {"variant": variant, "steps_per_s": round(perf["steps_per_s"], 3),
            "samples_per_s": round(perf["samples_per_s"], 2), "measured_steps": perf["measured_steps"],
            "peak_memory_mb": round(perf["peak_memory_mb"], 1), "memory_kind": perf["memory_kind"],
            "job_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=128, help="training size in pixels")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per job")
    ap.add_argument("--log-every", type=int, default=5, help="the first window (warm-up) is not timed")
    ap.add_argument("--workers", type=int, default=2, help="DeepSpeed ranks (Ray Train workers)")
    ap.add_argument("--batch", type=int, default=2, help="examples per rank per step (engine.micro_batch)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--repeats", type=int, default=2, help="alternating jobs per variant (median kept)")
    args = ap.parse_args()

    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.infra.config import build

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        dataset = str(Path(tmp) / "phantom")
        run_ingest(build(IngestConfig, {"out": dataset, "cohort": {"name": "phantom", "phantom": {
            "num": 32, "height": args.resolution, "width": args.resolution}}}), progress=False)
        for r in range(args.repeats):
            for variant in VARIANTS:
                row = job(variant, dataset, Path(tmp) / f"{variant}-{r}", args)
                results[variant].append(row)
                print(json.dumps({"benchmark": "lora_train_throughput", "repeat": r, **row}), flush=True)

    def median(variant: str, key: str) -> float:
        return round(statistics.median(row[key] for row in results[variant]), 3)

    import torch

    cached, live = median("cached_latents", "steps_per_s"), median("vae_every_step", "steps_per_s")
    print(json.dumps({
        "benchmark": "lora_train_throughput", "path": "launcher.train (Ray Train + DeepSpeed + LoraTask)",
        "model": "tiny", "device": "cuda" if torch.cuda.is_available() else "cpu",
        "workers": args.workers, "resolution": args.resolution, "batch_per_rank": args.batch,
        "global_batch": args.batch * args.workers, "lora_rank": args.rank, "steps": args.steps,
        "cached_latents_steps_per_s": cached, "vae_every_step_steps_per_s": live,
        "speedup_cached_latents": round(cached / live, 3),
        "speedup_per_round": [round(c["steps_per_s"] / v["steps_per_s"], 3)
                              for c, v in zip(results["cached_latents"], results["vae_every_step"])],
        "peak_memory_mb": {v: median(v, "peak_memory_mb") for v in VARIANTS},
        "memory_kind": results["cached_latents"][0]["memory_kind"],
    }), flush=True)


if __name__ == "__main__":
    main()
