from __future__ import annotations

import pickle
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from sonosynth.datasets.indexed import ShardDataset, mix_indexed
from sonosynth.datasets.manifest import read_manifest
from sonosynth.datasets.reader import DatasetReader, DataSource, collate_list, mix
from sonosynth.datasets.shards import write_tar
from sonosynth.infra.storage import StorageError, open_storage


def _same(a, b):
    assert a["key"] == b["key"] and a["meta"] == b["meta"]
    assert a["image"].dtype == torch.uint8 and a["image"].shape == b["image"].shape
    assert torch.equal(a["image"], b["image"])
    assert (a["mask"] is None) == (b["mask"] is None)
    assert a["mask"] is None or torch.equal(a["mask"], b["mask"])


def test_index_gives_the_streaming_readers_items_for_every_key(two_datasets):
    a, _ = two_datasets
    ds = ShardDataset(a)
    streamed = {s["key"]: s for s in DatasetReader(a)}
    assert len(ds) == 40 and ds.keys() == sorted(streamed)
    for i, key in enumerate(ds.keys()):
        _same(ds[i], streamed[key])
        assert ds.meta(i) == streamed[key]["meta"]
    assert ds[-1]["key"] == ds.keys()[-1] and ds[0]["image"].shape == (1, 48, 48)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_split_and_key_filters_follow_the_manifest(two_datasets):
    a, _ = two_datasets
    table = read_manifest(open_storage(a)).to_pydict()
    for split in ("train", "val", "test"):
        ds = ShardDataset(a, split=split)
        assert ds.keys() == sorted(k for k, sp in zip(table["key"], table["split"]) if sp == split)
        assert {m["split"] for m in ds.metas()} <= {split}
    keys = sorted(table["key"])[3:9]
    assert ShardDataset(a, keys=keys + ["no-such-key"]).keys() == keys
    train = ShardDataset(a, split="train", keys=keys)
    assert set(train.keys()) == set(keys) & set(ShardDataset(a, split="train").keys())


def test_counts_mix_is_exact_and_seeded_and_picks_what_mix_picks(two_datasets):
    a, b = two_datasets
    da, db = ShardDataset(a), ShardDataset(b)
    m = mix_indexed([da, db], counts=[7, 13], seed=2)
    keys = m.keys()
    origin = Counter(k.split("-")[1][:4] for k in keys)  # phantom source ids start with the seed
    assert len(m) == 20 == len(set(keys)) and origin == {"s000": 7, "s001": 13}
    assert [m[i]["key"] for i in range(len(m))] == keys and m[-1]["key"] == keys[-1]
    assert mix_indexed([da, db], counts=[7, 13], seed=2).keys() == keys
    assert mix_indexed([da, db], counts=[7, 13], seed=3).keys() != keys
    streamed = mix([DataSource(uri=a, count=7, split=None), DataSource(uri=b, count=13, split=None)], seed=2)
    assert sorted(s["key"] for s in streamed) == sorted(keys)
    assert len(mix_indexed([da, db], counts=[2, None])) == 32 and len(mix_indexed([da, db])) == 70
    assert m.meta(0) == m[0]["meta"]


def test_counts_beyond_a_dataset_name_it(two_datasets):
    a, b = two_datasets
    da, db = ShardDataset(a), ShardDataset(b, split="train")
    with pytest.raises(ValueError, match=re.escape(f"{db.uri} has {len(db)} samples in split 'train'") +
                       f".*count {len(db) + 1}.*Lower the count"):
        mix_indexed([da, db], counts=[1, len(db) + 1])
    with pytest.raises(ValueError, match="one count per dataset"):
        mix_indexed([da, db], counts=[1])


def test_two_dataloader_workers_read_every_sample_once(two_datasets):
    a, _ = two_datasets
    ds = ShardDataset(a)
    ds[0]  # files opened before the fork stay usable in the workers
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=True, collate_fn=collate_list,
                        generator=torch.Generator().manual_seed(0))
    items = [s for batch in loader for s in batch]
    assert sorted(s["key"] for s in items) == ds.keys()
    position = {k: i for i, k in enumerate(ds.keys())}
    for s in items:
        _same(s, ds[position[s["key"]]])
    # a worker packs a batch's pixels into one shared block: one handoff per batch, not per tensor
    assert items[0]["image"].untyped_storage().nbytes() > items[0]["image"].numel()


def test_pickled_dataset_reopens_its_files(two_datasets):
    a, _ = two_datasets
    ds = ShardDataset(a)
    ds[1]
    clone = pickle.loads(pickle.dumps(ds))
    _same(clone[1], ds[1])
    ds.close()
    _same(ds[2], clone[2])


def test_a_shard_missing_samples_of_the_manifest_is_a_clear_error(two_datasets, tmp_path):
    a, _ = two_datasets
    copy = Path(shutil.copytree(a, tmp_path / "copy"))
    shard = sorted((copy / "shards").glob("*.tar"))[0]
    write_tar(list(DatasetReader(str(copy)).samples())[:3], shard)  # first shard keeps 3 of 5
    with pytest.raises(StorageError, match="2 samples of the manifest are not in their shards"):
        ShardDataset(str(copy))


def test_open_files_are_bounded(two_datasets, monkeypatch):
    import sonosynth.datasets.indexed as indexed

    a, _ = two_datasets
    monkeypatch.setattr(indexed, "MAX_OPEN_SHARDS", 2)
    ds = ShardDataset(a)
    streamed = {s["key"]: s for s in DatasetReader(a)}
    for i in list(range(len(ds))) + [0, 39, 5]:
        _same(ds[i], streamed[ds.key(i)])
        assert len(ds._files) <= 2
