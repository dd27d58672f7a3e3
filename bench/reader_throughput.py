"""Reader throughput: sonosynth shards vs the same images as PNG files, side by side.

One run, the same phantom samples: the streaming ``DatasetReader`` and the map-style
``ShardDataset`` against a map-style reader of one PNG file per image and per mask (the
layout cohorts ship in), from a local folder and from S3 (a real moto_server over HTTP on
loopback). Every side decodes with ``records.decode_png`` into uint8 [1,H,W] tensors, and
the tensors are checked equal. Every reader runs in a DataLoader (batch 32, list collate)
with the same number of worker processes; workers are persistent and warmed up by one pass,
so the figures are steady-state throughput (medians of interleaved passes; a speedup is the
median of the per-round ratios). The headline speedups are at the largest worker count. CPU time per
sample (this process and its workers; the moto_server apart) is reported too: unlike
samples/s it barely moves when other jobs share the machine. Prints one JSON object per
line; the last one is the summary.

    .venv/bin/python bench/reader_throughput.py [--num 512] [--size 256] [--workers 0 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sonosynth.datasets.indexed import ShardDataset
from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.reader import DatasetReader, collate_list, to_tensors
from sonosynth.datasets.records import Sample, decode_png
from sonosynth.infra.config import build
from sonosynth.infra.local_s3 import moto_server, use_endpoint
from sonosynth.infra.storage import LocalStorage, open_storage


class PngFiles(Dataset):
    """The baseline: one image file and one mask file per sample, as cohorts ship them."""

    def __init__(self, root: Path):
        self.images = sorted((root / "image").glob("*.png"))
        self.root, self.keys = root, [p.stem for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        mask = self.root / "mask" / image.name
        return to_tensors(Sample(image.stem, decode_png(image.read_bytes()),
                                 decode_png(mask.read_bytes()), {}))


class S3PngFiles(Dataset):
    """The same baseline on object storage: two GETs per sample, one S3 client per process (a
    client per sample, as an earlier version of this bench made, costs ~10 ms each)."""

    def __init__(self, uri: str, keys: list[str]):
        self.uri, self.keys, self._storage = uri, keys, None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        if self._storage is None or self._storage[0] != os.getpid():
            self._storage = (os.getpid(), open_storage(self.uri))
        st, key = self._storage[1], self.keys[i]
        return to_tensors(Sample(key, decode_png(st.get_bytes(f"image/{key}.png")),
                                 decode_png(st.get_bytes(f"mask/{key}.png")), {}))


def _loader(dataset, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=32, num_workers=workers, collate_fn=collate_list,
                      persistent_workers=workers > 0)


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by (this process and its DataLoader workers, the moto_server)."""
    me = psutil.Process()
    client, server = sum(me.cpu_times()[:2]), 0.0
    for child in me.children():
        try:
            used = sum(child.cpu_times()[:2])
            if "moto" in " ".join(child.cmdline()):
                server += used
            else:
                client += used
        except psutil.Error:
            pass  # a worker of a loader that just ended
    return client, server


def _pass(loader: DataLoader, expected: int) -> tuple[float, float, float]:
    """(samples/s, client CPU ms per sample, server CPU ms per sample) of one pass."""
    cpu0, start = _cpu_seconds(), time.perf_counter()
    n = sum(len(batch) for batch in loader)
    elapsed, cpu1 = time.perf_counter() - start, _cpu_seconds()
    assert n == expected, (n, expected)
    return n / elapsed, (cpu1[0] - cpu0[0]) / n * 1e3, (cpu1[1] - cpu0[1]) / n * 1e3


def _measure(storage: str, readers: dict[str, Dataset], workers: int, args, sizes: dict[str, float],
             repeats: int) -> dict:
    """Samples/s of each reader: one warm-up pass, then ``repeats`` interleaved timed passes."""
    loaders = {name: _loader(ds, workers) for name, ds in readers.items()}
    for loader in loaders.values():
        _pass(loader, args.num)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in loaders}
    for _ in range(repeats):  # interleaved, so drift hits every reader alike
        for name, loader in loaders.items():
            runs[name].append(_pass(loader, args.num))
    out = {}
    for name, passes in runs.items():
        rate, client, server = (float(np.median(col)) for col in zip(*passes))
        row = {"storage": storage, "reader": name, "workers": workers, "samples_per_s": round(rate, 1),
               "decoded_mb_per_s": round(rate * sizes["decoded"] / 1e6, 1),
               "read_mb_per_s": round(rate * sizes[name] / 1e6, 1), "cpu_ms_per_sample": round(client, 3),
               **({"server_cpu_ms_per_sample": round(server, 3)} if storage == "s3" else {}),
               "runs": [round(p[0], 1) for p in passes]}
        print(json.dumps(row), flush=True)
        out[name] = row
    del loader, loaders  # their persistent workers end here
    return out


def _check_equal(readers: dict[str, Dataset], stream: DatasetReader, keys: list[str]) -> None:
    """The same tensors from every reader (decoded by the same decode_png)."""
    streamed = {s["key"]: s for s in stream if s["key"] in keys}
    for name, ds in readers.items():
        for key in keys:
            got, ref = ds[(ds.keys() if callable(ds.keys) else ds.keys).index(key)], streamed[key]
            assert got["key"] == key and torch.equal(got["image"], ref["image"]) and \
                torch.equal(got["mask"], ref["mask"]), (name, key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=5, help="Timed passes per reader, local.")
    ap.add_argument("--s3-repeats", type=int, default=3, help="Timed passes per reader, S3 (PNG objects are slow).")
    ap.add_argument("--no-s3", action="store_true", help="Skip the S3 (moto_server) comparison.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    figures: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = build(IngestConfig, {"cohort": {"name": "phantom", "phantom": {
            "num": args.num, "height": args.size, "width": args.size}},
            "out": str(root / "ds"), "shards": {"max_samples": 128}})
        t = time.perf_counter()
        report = run_ingest(cfg, progress=False)
        ingest_rate = report.ingested / (time.perf_counter() - t)
        files = root / "files"
        (files / "image").mkdir(parents=True)
        (files / "mask").mkdir()
        for s in DatasetReader(cfg.out).samples():
            Image.fromarray(s.image).save(files / "image" / f"{s.key}.png", compress_level=3)
            Image.fromarray(s.mask).save(files / "mask" / f"{s.key}.png", compress_level=3)
        shard_bytes = sum(p.stat().st_size for p in (root / "ds" / "shards").glob("*.tar"))
        png_bytes = sum(p.stat().st_size for p in files.rglob("*.png"))
        sizes = {"decoded": 2 * args.size * args.size, "png_files": png_bytes / args.num,
                 "shards_stream": shard_bytes / args.num, "shard_dataset": shard_bytes / args.num}
        print(json.dumps({"setup": True, "samples": args.num, "image_px": args.size,
                          "ingest_samples_per_s": round(ingest_rate, 1), "shard_mb": round(shard_bytes / 1e6, 2),
                          "png_mb": round(png_bytes / 1e6, 2), "torch_threads": 1, "cpus": os.cpu_count(),
                          "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
        check = sorted(Path(p).stem for p in (files / "image").glob("*.png"))[:: max(1, args.num // 4)]
        local = {"shards_stream": DatasetReader(cfg.out), "shard_dataset": ShardDataset(cfg.out),
                 "png_files": PngFiles(files)}
        _check_equal({k: v for k, v in local.items() if k != "shards_stream"}, DatasetReader(cfg.out), check)
        figures["local"] = {w: _measure("local", local, w, args, sizes, args.repeats) for w in args.workers}
        if not args.no_s3:
            figures["s3"] = _bench_s3(root, files, cfg.out, args, sizes, check)
    print(json.dumps(_summary(figures, args)), flush=True)


def _bench_s3(root: Path, files: Path, dataset: str, args, sizes, check) -> dict[int, dict]:
    import boto3

    with moto_server() as url:
        use_endpoint(url)
        boto3.client("s3").create_bucket(Bucket="bench")
        ds_uri, files_uri = "s3://bench/dataset", "s3://bench/files"
        for src, uri in ((LocalStorage(dataset), ds_uri), (LocalStorage(files), files_uri)):
            dst = open_storage(uri)
            for key in src.list():
                dst.put_file(key, Path(src.uri) / key)
        keys = sorted(Path(k).stem for k in LocalStorage(files).list("image/"))
        t = time.perf_counter()
        indexed = ShardDataset(ds_uri, cache_dir=root / "cache")
        print(json.dumps({"storage": "s3", "shard_dataset_index_and_download_s": round(time.perf_counter() - t, 2)}),
              flush=True)
        readers = {"shards_stream": DatasetReader(ds_uri), "shard_dataset": indexed,
                   "png_files": S3PngFiles(files_uri, keys)}
        _check_equal({k: v for k, v in readers.items() if k != "shards_stream"}, DatasetReader(ds_uri), check)
        return {w: _measure("s3", readers, w, args, sizes, args.s3_repeats) for w in args.workers}


def _speedups(rows: dict[str, dict], name: str) -> dict[str, float]:
    """Speedup of reader ``name`` over the PNG files: the median of the per-round ratios (each
    round times both back to back, so load from other jobs hits both alike), and the ratio of
    CPU time per sample (client side, plus the server's on S3)."""
    ours, png = rows[name], rows["png_files"]
    cpu = [r.get("cpu_ms_per_sample", 0) + r.get("server_cpu_ms_per_sample", 0) for r in (ours, png)]
    return {"speedup": round(float(np.median([a / b for a, b in zip(ours["runs"], png["runs"])])), 3),
            "cpu_speedup": round(cpu[1] / cpu[0], 3) if cpu[0] else None}


def _summary(figures: dict[str, dict[int, dict]], args) -> dict:
    """Headline speedups at the largest worker count (DataLoader workers, as training reads);
    then every worker count with each reader's samples/s, MB/s and CPU ms per sample."""
    top = max(args.workers)
    out: dict = {"summary": True, "samples": args.num, "image_px": args.size, "headline_workers": top,
                 "load_avg_1min_at_end": round(os.getloadavg()[0], 2)}
    for storage, by_workers in figures.items():
        for name, label in (("shards_stream", "shards"), ("shard_dataset", "shard_dataset")):
            out[f"speedup_{storage}_{label}_vs_png"] = _speedups(by_workers[top], name)["speedup"]
    for storage, by_workers in figures.items():
        for w, rows in by_workers.items():
            out[f"{storage}_workers{w}"] = {
                **{f"{name}_{unit}": row[unit] for name, row in rows.items()
                   for unit in ("samples_per_s", "decoded_mb_per_s", "read_mb_per_s", "cpu_ms_per_sample")},
                **{f"{kind}_{label}_vs_png": value
                   for name, label in (("shards_stream", "shards"), ("shard_dataset", "shard_dataset"))
                   for kind, value in _speedups(rows, name).items()}}
    return out


if __name__ == "__main__":
    main()
