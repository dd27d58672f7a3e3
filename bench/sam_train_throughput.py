"""SAM fine-tuning throughput through the engine that ships (``launcher.train``: Ray Train
workers, DeepSpeed ZeRO-2, ``SamTask``), with image embeddings cached once vs the image
encoder recomputed every step (paper A's loop), and the evaluate stage's throughput.

The SAM has ViT-B's dimensions (embed 768, depth 12, 12 heads, global attention in blocks
2, 5, 8, 11; prompt width 256, decoder MLP 2048) at a reduced input size (``--size``, default
256 px instead of 1024) so that it fits a CPU. Both variants train the mask decoder only
(paper A) on the same phantom images, with the same config otherwise, in the same run on
one local Ray. Each job's steady-state rate comes from its summary.json (``perf``: steps
after the first log window; evaluation is off), and an epoch is ``--images`` examples at
that rate; the cached job also reports how long embedding every image took (its lineage's
``cache_seconds``). Then the evaluate stage scores the cached job's model on ``--eval-images``
images with 5 box draws each (model loaded once; images/s over the whole stage: loading, prediction
and every figure, after the libraries are imported; ``predict_images_per_s``: the SAM alone, one
encoder pass and 5 decoder calls per image).

Then the memory of the embedding cache: the same training with the embeddings in the node's disk
store (``embedding_cache``, the default) and held in every rank's memory (``in_memory: true``,
the older way), each at ``--small`` and ``--large`` images. Here the SAM has the real SAM's
embedding, 256 channels on a 64x64 grid (2 MB in float16, 4 MB in float32, as ViT-B's at 1024 px:
the size that makes memory grow), and ViT-B's mask decoder, behind a one-block encoder whose cost
does not matter here (``MEMORY_SAM``). Each rank's peak resident memory (VmHWM of every Ray Train
worker process, sampled while the job runs; the engine's ``perf.peak_memory_mb`` is rank 0's
``ru_maxrss``, the same figure for one rank) gives ``rss_ratio_large_vs_small`` (disk store,
expected ~1) and ``rss_ratio_large_vs_small_ram``; the epoch time of the two at the large size
gives ``speed_ratio_disk_vs_ram_cache`` (ram epoch_s / disk epoch_s).

Prints one JSON line per job, one for the evaluation, then a summary line (the last line) with
``speedup_cached_vs_recompute`` (epoch time, recompute / cached), ``eval_images_per_s`` and the
memory figures.

    .venv/bin/python bench/sam_train_throughput.py [--size 256] [--images 20] [--batch 5] \\
        [--workers 2] [--cached-steps 24] [--recompute-steps 6] [--eval-images 8] \\
        [--small 64] [--large 256] [--memory-steps 14]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

VIT_B = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": [2, 5, 8, 11],
         "window_size": 14, "prompt_embed_dim": 256, "decoder_depth": 2, "decoder_heads": 8, "decoder_mlp_dim": 2048,
         "mask_in_chans": 16}
"""segment_anything's vit_b dimensions (``build_sam_vit_b``), as a tiny-SAM config."""
MEMORY_SAM = {"image_size": 256, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
              "global_attn_indexes": [], "window_size": 8, "prompt_embed_dim": 256, "decoder_depth": 2,
              "decoder_heads": 8, "decoder_mlp_dim": 2048, "mask_in_chans": 16}
"""The real SAM's embedding (256 x 64 x 64) and ViT-B's mask decoder behind a one-block encoder."""


def job(variant: str, dataset: str, out: Path, args) -> dict:
    from sonosynth.infra.config import build
    from sonosynth.trainers.launcher import train
    from sonosynth.trainers.sam.train import SamTrainConfig

    steps = args.cached_steps if variant == "cached_embeddings" else args.recompute_steps
    log_every = max(1, steps // 6)
    cfg = build(SamTrainConfig, {
        "out": str(out), "mode": "decoder", "cache_embeddings": variant == "cached_embeddings",
        "embedding_cache": {"dir": str(out / "embeddings")},
        "model": {"arch": "tiny", "tiny": {"image_size": args.size, **VIT_B}},
        "data": {"sources": {"real": {"dataset": dataset, "count": args.images}}, "image_size": args.size,
                 "val": {"count": 0}},
        "optim": {"lr": 1e-5, "weight_decay": 0.0, "grad_clip": None}, "tracking": {"enabled": False},
        "engine": {"workers": args.workers, "micro_batch": args.batch, "max_steps": steps, "best_metric": None,
                   "log_every": log_every, "checkpoint_every": steps, "progress": False}})
    t0 = time.perf_counter()
    summary = train(cfg)
    perf = summary["perf"]
    epoch_s = args.images / perf["samples_per_s"]
    return {"variant": variant, "epoch_s": round(epoch_s, 3), "steps_per_s": round(perf["steps_per_s"], 4),
            "samples_per_s": round(perf["samples_per_s"], 3), "measured_steps": perf["measured_steps"],
            "cache_seconds": summary["lineage"]["cache_seconds"], "peak_memory_mb": round(perf["peak_memory_mb"], 1),
            "memory_kind": perf["memory_kind"], "job_seconds": round(time.perf_counter() - t0, 1),
            "model": summary["model"]}


class WorkerPeaks:
    """Peak resident memory (VmHWM, MB) of each Ray Train worker process of a job, sampled while
    it runs (the bench's descendants: the local Ray's raylet starts them). Workers of the previous
    job that are still exiting when it starts are left out."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peaks, self._stop = every_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        me, earlier = psutil.Process(), None
        while not self._stop.is_set():
            workers = []
            for p in me.children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        workers.append(p.pid)
                except psutil.Error:
                    continue
            if earlier is None:
                earlier = set(workers)
            for pid in set(workers) - earlier:
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
                except (OSError, StopIteration):
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), hwm / 1024)
            self._stop.wait(self.every_s)

    def __enter__(self) -> "WorkerPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def memory_job(store: str, images: int, dataset: str, out: Path, args) -> dict:
    """Training with the embeddings in the disk store or in memory (``MEMORY_SAM``), each rank's peak RSS."""
    from sonosynth.infra.config import build
    from sonosynth.trainers.launcher import train
    from sonosynth.trainers.sam.train import SamTrainConfig

    steps = args.memory_steps
    cfg = build(SamTrainConfig, {
        "out": str(out), "mode": "decoder", "cache_embeddings": True,
        "embedding_cache": {"dir": str(out / "embeddings"), "in_memory": store == "ram"},
        "model": {"arch": "tiny", "tiny": MEMORY_SAM},
        "data": {"sources": {"real": {"dataset": dataset, "count": images}}, "image_size": 256, "val": {"count": 0}},
        "optim": {"lr": 1e-5, "weight_decay": 0.0, "grad_clip": None}, "tracking": {"enabled": False},
        "engine": {"workers": args.workers, "micro_batch": args.batch, "max_steps": steps, "best_metric": None,
                   "log_every": 2, "checkpoint_every": steps, "progress": False}})
    t0 = time.perf_counter()
    with WorkerPeaks() as peaks:
        summary = train(cfg)
    perf = summary["perf"]
    per_rank = sorted(round(v, 1) for v in peaks.peaks.values())
    return {"variant": f"memory_{store}", "images": images, "epoch_s": round(images / perf["samples_per_s"], 3),
            "samples_per_s": round(perf["samples_per_s"], 3), "measured_steps": perf["measured_steps"],
            "peak_rss_mb_per_rank": per_rank, "peak_rss_mb": max(per_rank) if per_rank else None,
            "engine_peak_memory_mb": round(perf["peak_memory_mb"], 1), "memory_kind": perf["memory_kind"],
            "cache_seconds": summary["lineage"]["cache_seconds"], "job_seconds": round(time.perf_counter() - t0, 1)}


def evaluation(model: str, dataset: str, out: Path, args) -> dict:
    """The evaluate stage with the trained model: load once, 5 box draws per image, every figure."""
    import monai.metrics  # noqa: F401 - imported before the clock starts (seconds on a cold start)

    from sonosynth.infra.config import build
    from sonosynth.launch.evaluate.segmentation import EvaluateConfig, model_predictor, run

    t0 = time.perf_counter()
    cfg = build(EvaluateConfig, {"dataset": dataset, "split": None, "model": model, "out": str(out), "box_draws": 5,
                                 "worst_cases": 0, "progress": False, "tracking": {"enabled": False}})
    predictor, predicting = model_predictor(cfg), [0.0]

    def timed(sample, boxes):
        t = time.perf_counter()
        masks = predictor(sample, boxes)
        predicting[0] += time.perf_counter() - t
        return masks

    report = run(cfg, predict_fn=timed)
    seconds = time.perf_counter() - t0
    n = report.figures["n_images"]
    return {"variant": "evaluate", "images": n, "box_draws": 5, "seconds": round(seconds, 2),
            "predict_seconds": round(predicting[0], 2), "predict_images_per_s": round(n / predicting[0], 3),
            "images_per_s": round(n / seconds, 3), "dice_mean": report.figures["dice_mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="input side of the ViT-B-sized encoder (SAM: 1024)")
    ap.add_argument("--images", type=int, default=20, help="training examples (one epoch)")
    ap.add_argument("--batch", type=int, default=5, help="examples per rank per step (paper A: 5)")
    ap.add_argument("--workers", type=int, default=2, help="DeepSpeed ranks (Ray Train workers)")
    ap.add_argument("--cached-steps", type=int, default=24, help="steps of the cached job")
    ap.add_argument("--recompute-steps", type=int, default=6, help="steps of the recompute job")
    ap.add_argument("--eval-images", type=int, default=8, help="images the evaluate stage scores")
    ap.add_argument("--small", type=int, default=64, help="images of the small set (memory runs)")
    ap.add_argument("--large", type=int, default=256, help="images of the large set (memory runs; >= 4x small)")
    ap.add_argument("--memory-steps", type=int, default=14, help="steps of each memory run (the first 2 unmeasured)")
    args = ap.parse_args()

    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.infra.config import build

    with tempfile.TemporaryDirectory(prefix="bench-sam-") as tmp:
        root = Path(tmp)
        dataset, held_out = str(root / "phantom"), str(root / "phantom-eval")
        many = str(root / "phantom-many")
        for path, num, seed, size in ((dataset, args.images, 0, args.size), (held_out, args.eval_images, 1, args.size),
                                      (many, args.large, 2, 256)):
            run_ingest(build(IngestConfig, {"out": path, "splits": {"val": 0.0, "test": 0.0}, "cohort": {
                "name": "phantom", "phantom": {"num": num, "height": size, "width": size, "seed": seed,
                                               "planes": ["brain"]}}}), progress=False)
        rows = {}
        for variant in ("cached_embeddings", "recompute_encoder"):
            rows[variant] = job(variant, dataset, root / variant, args)
            print(json.dumps({"benchmark": "sam_train_throughput", **rows[variant]}), flush=True)
        memory = {}
        for size, images in (("small", args.small), ("large", args.large)):
            for store in ("disk", "ram"):
                memory[store, size] = memory_job(store, images, many, root / f"memory-{store}-{size}", args)
                print(json.dumps({"benchmark": "sam_train_throughput", **memory[store, size]}), flush=True)
        import ray

        ray.shutdown()  # the local Ray's processes leave the CPUs to the evaluation
        ev = evaluation(rows["cached_embeddings"]["model"], held_out, root / "eval", args)
        print(json.dumps({"benchmark": "sam_train_throughput", **ev}), flush=True)

    import torch

    cached, live = rows["cached_embeddings"], rows["recompute_encoder"]
    peak = {k: row["peak_rss_mb"] for k, row in memory.items()}
    epoch = {store: memory[store, "large"]["epoch_s"] for store in ("disk", "ram")}
    epochs = 20  # paper A
    print(json.dumps({
        "benchmark": "sam_train_throughput", "path": "launcher.train (Ray Train + DeepSpeed + SamTask), mode decoder",
        "model": f"SAM with ViT-B dimensions at {args.size} px input", "device": "cuda" if torch.cuda.is_available()
        else "cpu", "workers": args.workers, "batch_per_rank": args.batch, "images": args.images,
        "epoch_s_cached": cached["epoch_s"], "epoch_s_recompute": live["epoch_s"],
        "cache_seconds": cached["cache_seconds"],
        "speedup_cached_vs_recompute": round(live["epoch_s"] / cached["epoch_s"], 2),
        "speedup_20_epochs_incl_cache": round(epochs * live["epoch_s"] / (cached["cache_seconds"]
                                                                          + epochs * cached["epoch_s"]), 2),
        "eval_images_per_s": ev["images_per_s"], "eval_predict_images_per_s": ev["predict_images_per_s"],
        "eval_box_draws": ev["box_draws"],
        "memory_model": "SAM embedding 256x64x64 (float16 rows, 2 MB), ViT-B mask decoder",
        "memory_images": [args.small, args.large],
        "peak_rss_mb_disk": [peak["disk", "small"], peak["disk", "large"]],
        "peak_rss_mb_ram": [peak["ram", "small"], peak["ram", "large"]],
        "rss_ratio_large_vs_small": ratio(peak["disk", "large"], peak["disk", "small"]),
        "rss_ratio_large_vs_small_ram": ratio(peak["ram", "large"], peak["ram", "small"]),
        "epoch_s_disk_cache": epoch["disk"], "epoch_s_ram_cache": epoch["ram"],
        "speed_ratio_disk_vs_ram_cache": ratio(epoch["ram"], epoch["disk"]),
    }), flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


if __name__ == "__main__":
    main()
