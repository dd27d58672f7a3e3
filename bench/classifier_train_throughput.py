"""Classifier training throughput: images read from sonosynth shards vs a folder of PNG files.

One run, one model, the same images: the train-classifier task's training items over the
shards (``ShardDataset`` through the task's ``ClassifierItems``) against the same images as
one PNG file each (a labels CSV beside them, the layout cohorts ship in), from a local folder
and from S3 (a real moto_server over HTTP on loopback). Both go through the engine's loader
path (``batching.make_loader`` with ``StepBatches``: per-example seeding, DataLoader workers)
into the same training step: the task's ``ClassifierModule`` forward (cross-entropy), backward
and an AdamW step, one process with one torch thread, as one CPU rank trains. Every image is
decoded with ``records.decode_png`` and transformed by the same seeded augmentation (the
tensors are checked equal). The variants alternate in rounds (warm-up steps first, persistent
loader workers); a speedup is the median of the per-round ratios. Prints one JSON object per
line; the last one is the summary (``speedup_shards_vs_png``, ``speedup_s3_shards_vs_png``).

    .venv/bin/python bench/classifier_train_throughput.py [--num 384] [--size 320] [--image-size 96] \\
        [--batch 16] [--workers 2] [--steps 30] [--repeats 3] [--no-s3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import Dataset

from sonosynth.datasets.records import decode_png
from sonosynth.infra.config import build
from sonosynth.infra.local_s3 import moto_server, use_endpoint
from sonosynth.infra.storage import LocalStorage, open_storage

PLANES = ["abdomen", "brain", "femur", "thorax"]


class PngItems(Dataset):
    """The baseline: one PNG file per image (local folder or s3:// prefix), the same items as
    the task's: {pixel_values, label, index}. One storage client per process."""

    def __init__(self, uri: str, keys: list[str], labels: list[int], transform):
        self.uri, self.keys, self.labels, self.transform = uri, keys, labels, transform
        self._store = None

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> np.ndarray:
        if self._store is None or self._store[0] != os.getpid():
            self._store = (os.getpid(), open_storage(self.uri))
        return decode_png(self._store[1].get_bytes(f"{self.keys[i]}.png"))[None]

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.transform(self.image(i), index=None), "label": self.labels[i], "index": i}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}


def make_data(root: Path, args) -> tuple[str, Path, list[str], list[str]]:
    """A phantom dataset (shards) and the same images as PNG files; (dataset, folder, keys, planes)."""
    from PIL import Image

    from sonosynth.datasets.indexed import ShardDataset
    from sonosynth.datasets.ingest import IngestConfig, run_ingest

    cfg = build(IngestConfig, {"out": str(root / "ds"), "splits": {"val": 0.0, "test": 0.0},
                               "shards": {"max_samples": 128}, "cohort": {"name": "phantom", "phantom": {
                                   "num": args.num, "height": args.size, "width": args.size, "planes": PLANES}}})
    run_ingest(cfg, progress=False)
    ds = ShardDataset(cfg.out)
    folder = root / "png"
    folder.mkdir()
    keys, planes = ds.keys(), []
    for i, key in enumerate(keys):
        Image.fromarray(ds[i]["image"][0].numpy()).save(folder / f"{key}.png", compress_level=3)
        planes.append(ds.meta(i)["plane"])
    (folder / "labels.csv").write_text("key,plane\n" + "".join(f"{k},{p}\n" for k, p in zip(keys, planes)))
    return cfg.out, folder, keys, planes


def variants(dataset: str, png_uri: str, keys: list[str], planes: list[str], args, cache_dir: Path):
    """(shards items, PNG items, model config, augment config): the task's own pieces."""
    from sonosynth.trainers.classifier.data import ClassifierAugmentConfig, build_transforms
    from sonosynth.trainers.classifier.sources import ClassifierDataConfig, plan_data
    from sonosynth.trainers.classifier.train import ClassifierItems

    plan = plan_data(build(ClassifierDataConfig, {"sources": {"real": {"dataset": dataset, "split": None}},
                                                  "validation": {"datasets": [dataset], "split": "train"}}))
    labels = plan.train_labels()
    assert plan.train[0].keys == keys
    augment = build(ClassifierAugmentConfig, {"max_side": args.max_side})
    train_tf, _ = build_transforms(args.image_size, [0.2] * 3, [0.15] * 3, augment, 0)
    shards = ClassifierItems(plan.train, labels, train_tf, str(cache_dir), None)
    png = PngItems(png_uri, keys, [plan.labels.index(p) for p in planes], train_tf)
    return {"shards": shards, "png": png}


def check_equal(items: dict[str, Dataset], n: int = 4) -> None:
    from sonosynth.trainers.batching import seed_everything

    for i in range(0, len(items["png"]), max(1, len(items["png"]) // n)):
        out = {}
        for name, ds in items.items():
            seed_everything(i)
            out[name] = ds[i]
        assert torch.equal(out["shards"]["pixel_values"], out["png"]["pixel_values"]), i
        assert out["shards"]["label"] == out["png"]["label"], i


def cpu_seconds(extra: list[psutil.Process]) -> float:
    """CPU seconds so far of this process, its children (loader workers) and ``extra``."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True), *extra]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(storage: str, items: dict[str, Dataset], args, server: list[psutil.Process] = ()) -> dict:
    """Images/s and CPU ms per image of each variant, rounds alternating; one model and optimizer."""
    from sonosynth.trainers.batching import StepBatches, make_loader
    from sonosynth.trainers.classifier.models import ClassifierModelConfig, build_classifier
    from sonosynth.trainers.classifier.train import ClassifierModule

    net = build_classifier(ClassifierModelConfig(backbone=args.backbone, image_size=args.image_size,
                                                 pixel_mean=[0.2], pixel_std=[0.15]), PLANES)
    module = ClassifierModule(net, None, 0.0)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    per_round = args.warmup + args.steps
    total = per_round * args.repeats
    loaders = {name: iter(make_loader(ds, StepBatches(len(ds), 0, start=0, total=total, rank=0, world=1,
                                                      micro_batch=args.batch, grad_accum=1),
                                      None, workers=args.workers, prefetch=2, pin=False, persistent=True))
               for name, ds in items.items()}
    runs: dict[str, list[float]] = {name: [] for name in items}
    cpu: dict[str, list[float]] = {name: [] for name in items}
    gen = torch.Generator()
    for r in range(args.repeats):
        for name, batches in loaders.items():
            for s in range(per_round):
                if s == args.warmup:
                    t0, c0 = time.perf_counter(), cpu_seconds(list(server))
                loss, _ = module(next(batches), gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
            images = args.steps * args.batch
            rate = images / (time.perf_counter() - t0)
            runs[name].append(rate)
            cpu[name].append(1000 * (cpu_seconds(list(server)) - c0) / images)
            print(json.dumps({"storage": storage, "variant": name, "round": r, "images_per_s": round(rate, 1),
                              "cpu_ms_per_image": round(cpu[name][-1], 2)}), flush=True)
    ratio = statistics.median(a / b for a, b in zip(runs["shards"], runs["png"]))
    cpu_ms = {name: statistics.median(v) for name, v in cpu.items()}
    return {"shards_images_per_s": round(statistics.median(runs["shards"]), 1),
            "png_images_per_s": round(statistics.median(runs["png"]), 1), "speedup": round(ratio, 3),
            "shards_cpu_ms_per_image": round(cpu_ms["shards"], 2), "png_cpu_ms_per_image": round(cpu_ms["png"], 2),
            "cpu_speedup": round(cpu_ms["png"] / cpu_ms["shards"], 3)}


def bench_s3(root: Path, dataset: str, folder: Path, keys, planes, args) -> dict:
    import boto3

    with moto_server() as url:
        use_endpoint(url)
        boto3.client("s3").create_bucket(Bucket="bench")
        for src, uri in ((LocalStorage(dataset), "s3://bench/dataset"), (LocalStorage(folder), "s3://bench/png")):
            dst = open_storage(uri)
            for key in src.list():
                dst.put_file(key, Path(src.uri) / key)
        t = time.perf_counter()
        items = variants("s3://bench/dataset", "s3://bench/png", keys, planes, args, root / "cache")
        print(json.dumps({"storage": "s3", "shard_index_and_download_s": round(time.perf_counter() - t, 2)}),
              flush=True)
        check_equal(items)
        server = [p for p in psutil.Process().children(recursive=True)
                  if any("moto_server" in part for part in p.cmdline())]
        return measure("s3", items, args, server)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=512, help="phantom images")
    ap.add_argument("--size", type=int, default=320, help="side of the stored images in pixels")
    ap.add_argument("--image-size", type=int, default=64, help="model input (model.image_size)")
    ap.add_argument("--max-side", type=int, default=128, help="augment.max_side")
    ap.add_argument("--backbone", default="tiny_resnet")
    ap.add_argument("--batch", type=int, default=32, help="images per step (engine.micro_batch)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (engine.loader_workers)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps at the start of every round")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (the variants alternate)")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 (moto_server) comparison")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset, folder, keys, planes = make_data(root, args)
        shard_mb = sum(p.stat().st_size for p in Path(dataset).rglob("*.tar")) / 1e6
        png_mb = sum(p.stat().st_size for p in folder.glob("*.png")) / 1e6
        print(json.dumps({"setup": True, "images": args.num, "stored_px": args.size, "image_size": args.image_size,
                          "backbone": args.backbone, "batch": args.batch, "loader_workers": args.workers,
                          "shard_mb": round(shard_mb, 2), "png_mb": round(png_mb, 2), "cpus": os.cpu_count(),
                          "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
        items = variants(dataset, str(folder), keys, planes, args, root / "cache")
        check_equal(items)
        local = measure("local", items, args)
        s3 = None if args.no_s3 else bench_s3(root, dataset, folder, keys, planes, args)
    summary = {"summary": True, "speedup_shards_vs_png": local["speedup"],
               "speedup_s3_shards_vs_png": s3["speedup"] if s3 else None,
               "cpu_speedup_shards_vs_png": local["cpu_speedup"],
               "cpu_speedup_s3_shards_vs_png": s3["cpu_speedup"] if s3 else None,
               "local": local, "s3": s3, "images": args.num, "stored_px": args.size, "image_size": args.image_size,
               "backbone": args.backbone, "batch": args.batch, "loader_workers": args.workers,
               "load_avg_1min_at_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
