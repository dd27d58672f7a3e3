"""Ingest and reader throughput: shards streamed by DatasetReader vs the same images and
masks read as individual PNG files, measured in the same run, from a local folder and
from S3 (a real moto_server over HTTP on loopback). Prints JSON.

    .venv/bin/python bench/reader_throughput.py [--num 1024] [--size 256] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.reader import DatasetReader, collate_list, to_tensors
from sonosynth.datasets.records import Sample, decode_png
from sonosynth.infra.config import build
from sonosynth.infra.local_s3 import moto_server, use_endpoint
from sonosynth.infra.storage import LocalStorage, open_storage


class S3PngFiles(Dataset):
    """The same baseline on object storage: two GETs per sample."""

    def __init__(self, uri: str, keys: list[str]):
        self.uri, self.keys = uri, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        st = open_storage(self.uri)
        key = self.keys[i]
        return to_tensors(Sample(key, decode_png(st.get_bytes(f"image/{key}.png")),
                                 decode_png(st.get_bytes(f"mask/{key}.png")), {}))


class PngFiles(Dataset):
    """The baseline: one image file and one mask file per sample, as cohorts ship them."""

    def __init__(self, root: Path):
        self.images = sorted((root / "image").glob("*.png"))
        self.root = root

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        mask = self.root / "mask" / image.name
        return to_tensors(Sample(image.stem, decode_png(image.read_bytes()),
                                 decode_png(mask.read_bytes()), {}))


def _rate(loader, expected: int) -> float:
    start = time.perf_counter()
    n = sum(len(batch) for batch in loader)
    elapsed = time.perf_counter() - start
    assert n == expected, (n, expected)
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=1024)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true", help="Skip the S3 (moto_server) comparison.")
    args = ap.parse_args()
    torch.set_num_threads(1)
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
        results = {"samples": args.num, "image_px": args.size, "ingest_samples_per_s": round(ingest_rate, 1),
                   "readers": []}
        for workers in args.workers:
            shard_rates, file_rates = [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                shard_rates.append(_rate(DataLoader(DatasetReader(cfg.out), batch_size=32, num_workers=workers,
                                                    collate_fn=collate_list), args.num))
                file_rates.append(_rate(DataLoader(PngFiles(files), batch_size=32, num_workers=workers,
                                                   collate_fn=collate_list), args.num))
            s, f = float(np.median(shard_rates)), float(np.median(file_rates))
            results["readers"].append({"workers": workers, "shard_samples_per_s": round(s, 1),
                                       "png_files_samples_per_s": round(f, 1), "ratio_shards_vs_files": round(s / f, 3)})
        if not args.no_s3:
            results["s3"] = _bench_s3(root, files, cfg.out, args)
    print(json.dumps(results, indent=2))


def _bench_s3(root: Path, files: Path, dataset: str, args) -> list[dict]:
    import boto3

    out = []
    with moto_server() as url:
        use_endpoint(url)
        boto3.client("s3").create_bucket(Bucket="bench")
        local_ds, local_files = LocalStorage(dataset), LocalStorage(files)
        ds_uri, files_uri = "s3://bench/dataset", "s3://bench/files"
        for src, uri in ((local_ds, ds_uri), (local_files, files_uri)):
            dst = open_storage(uri)
            for key in src.list():
                dst.put_file(key, Path(src.uri) / key)
        keys = sorted(Path(k).stem for k in local_files.list("image/"))
        for workers in args.workers:
            shard_rates, file_rates = [], []
            for _ in range(args.repeats):
                shard_rates.append(_rate(DataLoader(DatasetReader(ds_uri), batch_size=32, num_workers=workers,
                                                    collate_fn=collate_list), args.num))
                file_rates.append(_rate(DataLoader(S3PngFiles(files_uri, keys), batch_size=32,
                                                   num_workers=workers, collate_fn=collate_list), args.num))
            s, f = float(np.median(shard_rates)), float(np.median(file_rates))
            out.append({"workers": workers, "shard_samples_per_s": round(s, 1),
                        "png_objects_samples_per_s": round(f, 1), "ratio_shards_vs_objects": round(s / f, 3)})
    return out


if __name__ == "__main__":
    main()
