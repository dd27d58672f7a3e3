"""Reading a dataset on a real S3-compatible server (moto_server): streamed and indexed."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from sonosynth.datasets.indexed import ShardDataset, mix_indexed
from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.reader import DatasetReader, collate_list
from sonosynth.datasets.shards import ShardRecord, done_key
from sonosynth.infra.config import build
from sonosynth.infra.storage import S3Storage, open_storage

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_dataset(s3_bucket):
    uri = f"s3://{s3_bucket}/datasets/phantom"
    cfg = build(IngestConfig, {"cohort": {"name": "phantom", "phantom": {"num": 20, "height": 64, "width": 64}},
                               "out": uri, "shards": {"max_samples": 8}})
    assert run_ingest(cfg, progress=False).ingested == 20
    return uri


def test_shard_dataset_from_s3_matches_the_stream_and_caches_by_content(s3_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = ShardDataset(s3_dataset, cache_dir=cache)
    streamed = {s["key"]: s for s in DatasetReader(s3_dataset)}
    assert ds.keys() == sorted(streamed) and len(ds) == 20
    for i, key in enumerate(ds.keys()):
        item = ds[i]
        assert torch.equal(item["image"], streamed[key]["image"]) and torch.equal(item["mask"], streamed[key]["mask"])
        assert item["meta"] == streamed[key]["meta"]
    store = open_storage(s3_dataset)
    digests = {ShardRecord.load(store, done_key(s)).sha256 for s in store.list("shards/")}
    assert {p.name for p in cache.iterdir()} == {f"{d}.tar" for d in digests}  # no partial files left

    def no_download(self, key):
        raise AssertionError(f"downloaded {key} again")

    monkeypatch.setattr(S3Storage, "open_read", no_download)
    again = ShardDataset(s3_dataset, cache_dir=cache, split="train")
    assert len(again) and again.keys() == [k for k in ds.keys() if streamed[k]["meta"]["split"] == "train"]


def test_shard_dataset_from_s3_in_two_dataloader_workers(s3_dataset, tmp_path):
    ds = ShardDataset(s3_dataset, cache_dir=tmp_path / "cache")
    loader = DataLoader(mix_indexed([ds], counts=[12], seed=1), batch_size=4, num_workers=2,
                        collate_fn=collate_list)
    keys = [s["key"] for batch in loader for s in batch]
    assert len(keys) == 12 == len(set(keys)) and set(keys) <= set(ds.keys())
