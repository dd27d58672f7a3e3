"""LoRA training throughput: latents cached once (the default) vs encoding every example
through the frozen VAE every step. Same run, same tiny model, same data, same step code
(``LoraDiffusionModule`` forward + backward + AdamW), one process per variant so that each
reports its own peak memory (peak RSS on CPU, peak allocated on GPU). Prints JSON.

    .venv/bin/python bench/lora_train_throughput.py [--resolution 128] [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(variant: str, dataset: str, resolution: int, steps: int, batch: int, rank: int) -> dict:
    import torch

    from sonosynth.infra.config import build
    from sonosynth.infra.storage import open_storage
    from sonosynth.trainers.diffusion.train import LoraTask, LoraTrainConfig
    from sonosynth.trainers.optim import build_optimizer
    from sonosynth.trainers.worker import WorkerContext, example_indices, noise_seed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = build(LoraTrainConfig, {
        "out": tempfile.mkdtemp(), "data": {"dataset": dataset, "split": None, "resolution": resolution},
        "lora": {"rank": rank}, "cache": {"latents": variant == "cached"},
        "engine": {"max_steps": steps, "workers": 1, "micro_batch": batch}})
    task = LoraTask(cfg, WorkerContext(0, 1, 0, device, open_storage(cfg.out)))
    module = task.module()
    optimizer, _ = build_optimizer(task.param_groups(), cfg.optim, steps)
    n = task.num_examples()

    def step(i: int) -> None:
        idx = example_indices(n, 0, step=i, micro=0, rank=0, world=1, micro_batch=batch, grad_accum=1)
        loss = module(task.batch(idx), torch.Generator().manual_seed(noise_seed(0, i, 0, 0)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(3):  # warm-up
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "steps_per_s": steps / seconds, "peak_memory_mb": peak / 2**20,
            "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
            "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=128, help="training size in pixels")
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per variant")
    ap.add_argument("--batch", type=int, default=4, help="examples per step")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per variant (median kept)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--dataset", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.dataset, args.resolution, args.steps, args.batch, args.rank)))
        return

    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.infra.config import build

    with tempfile.TemporaryDirectory() as tmp:
        dataset = str(Path(tmp) / "phantom")
        run_ingest(build(IngestConfig, {"out": dataset, "cohort": {"name": "phantom", "phantom": {
            "num": 32, "height": args.resolution, "width": args.resolution}}}), progress=False)
        results: dict[str, list[dict]] = {"cached": [], "vae_every_step": []}
        for _ in range(args.repeats):
            for variant in results:
                out = subprocess.run(
                    [sys.executable, __file__, "--variant", variant, "--dataset", dataset,
                     "--resolution", str(args.resolution), "--steps", str(args.steps),
                     "--batch", str(args.batch), "--rank", str(args.rank)],
                    capture_output=True, text=True, check=True)
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def median(variant: str, key: str) -> float:
        values = sorted(r[key] for r in results[variant])
        return values[len(values) // 2]

    cached, live = median("cached", "steps_per_s"), median("vae_every_step", "steps_per_s")
    print(json.dumps({
        "benchmark": "lora_train_throughput", "model": "tiny", "device": results["cached"][0]["device"],
        "resolution": args.resolution, "batch": args.batch, "lora_rank": args.rank, "steps": args.steps,
        "cached_latents_steps_per_s": round(cached, 3),
        "vae_every_step_steps_per_s": round(live, 3),
        "speedup_cached_vs_vae_every_step": round(cached / live, 3),
        "peak_memory_mb": {v: round(median(v, "peak_memory_mb"), 1) for v in results},
        "memory_kind": results["cached"][0]["memory_kind"],
        "runs": results,
    }, indent=1))


if __name__ == "__main__":
    main()
