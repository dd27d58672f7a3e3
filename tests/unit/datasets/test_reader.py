from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from sonosynth.datasets.reader import DatasetReader, DataSource, collate_list, mix
from sonosynth.datasets.tario import TarError, tar_members, tar_records


def test_plain_webdataset_reads_the_shards(two_datasets):
    a, _ = two_datasets
    urls = f"{a}/shards/phantom-{{000000..000007}}.tar"
    records = list(wds.WebDataset(urls, shardshuffle=False).decode("l"))
    assert len(records) == 40
    assert records[0]["image.png"].shape == (48, 48) and records[0]["meta.json"]["source"] == "real"


def test_workers_cover_every_sample_once(two_datasets):
    a, _ = two_datasets
    loader = DataLoader(DatasetReader(a, shuffle_buffer=8), batch_size=4, num_workers=2, collate_fn=collate_list)
    keys = [s["key"] for batch in loader for s in batch]
    assert len(keys) == 40 and len(set(keys)) == 40
    sample = next(iter(DatasetReader(a)))
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (1, 48, 48)
    assert sample["mask"].shape == (1, 48, 48)


def test_shuffle_is_seeded_and_changes_per_epoch(two_datasets):
    a, _ = two_datasets
    r = DatasetReader(a, shuffle_buffer=10, seed=5)
    e0 = [s["key"] for s in r]
    again = [s["key"] for s in DatasetReader(a, shuffle_buffer=10, seed=5)]
    r.set_epoch(1)
    e1 = [s["key"] for s in r]
    plain = [s["key"] for s in DatasetReader(a)]
    assert e0 == again and e0 != e1 and e0 != plain and sorted(e0) == sorted(plain)


def test_split_filter_matches_manifest(two_datasets):
    a, _ = two_datasets
    for split in ("train", "val", "test"):
        r = DatasetReader(a, split=split)
        got = [s["meta"]["split"] for s in r]
        assert set(got) <= {split} and len(got) == len(r)


def test_mix_by_count_is_exact(two_datasets):
    a, b = two_datasets
    m = mix([DataSource(uri=a, count=7, split=None), DataSource(uri=b, count=13, split=None)], seed=2)
    keys = [s["key"] for s in DataLoader(m, batch_size=None, num_workers=0)]
    origin = Counter(k.split("-")[1][:4] for k in keys)  # phantom source ids start with the seed
    assert len(keys) == 20 == len(set(keys)) and origin == {"s000": 7, "s001": 13}


def test_mix_by_ratio_draws_in_proportion(two_datasets):
    a, b = two_datasets
    m = mix([DataSource(uri=a, ratio=0.8, split=None), DataSource(uri=b, ratio=0.2, split=None)], seed=0)
    keys = [s["key"] for s in m]
    share_a = sum(k.split("-")[1].startswith("s000") for k in keys) / len(keys)
    assert len(keys) >= 30 and share_a > 0.6


def test_mix_rejects_mixed_modes_and_oversized_counts(two_datasets):
    a, b = two_datasets
    with pytest.raises(ValueError, match="every data source a count"):
        mix([DataSource(uri=a, count=3), DataSource(uri=b, ratio=0.5)])
    with pytest.raises(ValueError, match="Lower the count"):
        mix([DataSource(uri=a, count=999, split=None)])


def test_workers_give_the_same_tensors_as_the_main_process(two_datasets):
    a, _ = two_datasets
    plain = {s["key"]: s for s in DatasetReader(a)}
    loader = DataLoader(DatasetReader(a), batch_size=8, num_workers=2, collate_fn=collate_list)
    items = [s for batch in loader for s in batch]
    assert sorted(s["key"] for s in items) == sorted(plain)
    for s in items:
        ref = plain[s["key"]]
        assert torch.equal(s["image"], ref["image"]) and torch.equal(s["mask"], ref["mask"])
        assert s["meta"] == ref["meta"] and s["image"].shape == (1, 48, 48)
    first = items[0]["image"]  # packed into a shared block with its batch
    assert first.untyped_storage().nbytes() > first.numel() and first.is_shared()
    assert plain[items[0]["key"]]["image"].untyped_storage().nbytes() == 48 * 48


def test_records_match_webdatasets_own_tar_reader(two_datasets):
    a, _ = two_datasets
    shard = sorted(Path(a, "shards").glob("*.tar"))[0]
    with open(shard, "rb") as fh:
        ours = list(tar_records(fh, str(shard)))
    theirs = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(
        [{"url": str(shard), "stream": open(shard, "rb")}])))
    assert [{k: v for k, v in r.items() if k != "__url__"} for r in ours] == \
        [{k: v for k, v in r.items() if k not in ("__url__", "__local_path__")} for r in theirs]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_members_agree_with_tarfile(tmp_path, fmt):
    path = tmp_path / "t.tar"
    names = ["a/b/k1.image.png", "k2.meta.json", "dir/" + "x" * 120 + ".txt", "plain.bin", "ü-näme.json"]
    if fmt == tarfile.USTAR_FORMAT:
        names = [n for n in names if len(n) < 100 and n.isascii()]
    with tarfile.open(path, "w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, name in enumerate(names):
            data = bytes(range(256)) * (i * 3) + b"z" * i
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        want = [(m.name, m.offset_data, m.size, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    with open(path, "rb") as fh:
        assert list(tar_members(fh)) == want
    with open(path, "rb") as fh:
        assert [m[:3] for m in tar_members(fh, data=False)] == [m[:3] for m in want]
    damaged = bytearray(path.read_bytes())
    damaged[want[1][1] - 512 + 10] ^= 0xFF  # a byte of the second member's header
    with pytest.raises(TarError, match="no valid tar header"):
        list(tar_members(io.BytesIO(bytes(damaged))))
    with pytest.raises(TarError, match="truncated"):
        list(tar_members(io.BytesIO(path.read_bytes()[:want[1][1] + 100])))
