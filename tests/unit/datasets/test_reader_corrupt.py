"""Damaged shards: a clear error naming the shard, the byte offset and the member (on_error: raise),
or the sample / the rest of the shard skipped and counted (on_error: skip); unsafe member names
are refused under both."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from sonosynth.datasets.indexed import ShardDataset
from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.reader import DatasetReader, ReaderConfig, collate_list
from sonosynth.datasets.tario import CorruptShardError, UnsafeMemberError, tar_members
from sonosynth.infra.config import ConfigError, build
from sonosynth.infra.stage import StageFailed
from sonosynth.infra.storage import StorageError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """10 phantom samples in 2 shards of 5 (ingest, the project's own writer)."""
    out = tmp_path_factory.mktemp("corrupt") / "ds"
    run_ingest(build(IngestConfig, {"cohort": {"name": "phantom", "phantom": {"num": 10, "height": 48, "width": 48}},
                                    "out": str(out), "shards": {"max_samples": 5}}), progress=False)
    return out


@pytest.fixture
def ds(pristine, tmp_path):
    """A fresh copy to damage, and its first shard."""
    copy = Path(shutil.copytree(pristine, tmp_path / "ds"))
    return copy, sorted((copy / "shards").glob("*.tar"))[0]


def members(shard: Path) -> list[tuple[str, int, int]]:
    with open(shard, "rb") as fh:
        return [m[:3] for m in tar_members(fh, data=False)]


def keys(reader) -> list[str]:
    return [s["key"] for s in reader]


def test_on_error_is_a_config_field_with_two_values():
    assert build(ReaderConfig, {}).on_error == "raise"
    assert build(ReaderConfig, {"on_error": "skip"}).on_error == "skip"
    with pytest.raises(ConfigError, match="on_error"):
        build(ReaderConfig, {"on_error": "ignore"})


def test_a_truncated_shard_names_the_shard_and_the_byte_offset(ds):
    root, shard = ds
    name, offset, size = members(shard)[7]  # inside the third sample
    cut = offset + size // 2
    shard.write_bytes(shard.read_bytes()[:cut])
    for read in (lambda: keys(DatasetReader(str(root))), lambda: ShardDataset(str(root))):
        with pytest.raises(CorruptShardError) as err:
            read()
        msg = str(err.value)
        assert str(shard) in msg and f"truncated at byte {cut}" in msg and name in msg and "re-run" in msg
        assert err.value.offset == cut and err.value.member == name and isinstance(err.value, StageFailed)

    reader = DatasetReader(str(root), on_error="skip")
    got = keys(reader)
    assert len(got) == 5 + 2  # the other shard, and the two samples before the break
    assert reader.skipped == {"truncated_shard": 1}
    (event,) = reader.skips.events
    assert (event.shard, event.offset, event.member) == (str(shard), cut, name)
    indexed = ShardDataset(str(root), on_error="skip")
    assert sorted(indexed.keys()) == sorted(got) and indexed.skipped == {"truncated_shard": 1}
    assert [indexed[i]["key"] for i in range(len(indexed))] == indexed.keys()


class Body:
    """A stream that cannot seek, like an S3 response body."""

    def __init__(self, data: bytes):
        self.fh = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self.fh.read(n)


@pytest.mark.parametrize("data", [True, False])
@pytest.mark.parametrize("stream", [io.BytesIO, Body])
def test_tar_members_find_the_cut_when_reading_or_skipping_data(ds, data, stream):
    _, shard = ds
    name, offset, size = members(shard)[4]
    cut = offset + 100
    with pytest.raises(CorruptShardError, match=f"member {re.escape(name)} is truncated at byte {cut}") as err:
        list(tar_members(stream(shard.read_bytes()[:cut]), data=data, where="s3://b/ds/shards/x.tar"))
    assert str(err.value).startswith("s3://b/ds/shards/x.tar: ") and err.value.offset == cut


def test_a_shard_cut_between_members_is_not_read_as_a_shorter_one(ds):
    root, shard = ds
    header = members(shard)[9][1] - 512  # the header of the fourth sample's first member
    shard.write_bytes(shard.read_bytes()[:header])
    with pytest.raises(CorruptShardError, match=f"ends at byte {header} without the tar end-of-archive"):
        keys(DatasetReader(str(root)))
    reader = DatasetReader(str(root), on_error="skip")
    # the sample read last may have lost members at the cut: it goes with the rest of the shard
    assert len(keys(reader)) == 5 + 2 and reader.skipped == {"truncated_shard": 1}


def test_a_corrupt_png_names_shard_member_and_offset(ds, caplog):
    root, shard = ds
    name, offset, size = next(m for m in members(shard) if m[0].endswith(".image.png"))
    data = bytearray(shard.read_bytes())
    data[offset:offset + size] = b"\x89PNG-not-really" + bytes(size - 15)
    shard.write_bytes(bytes(data))
    pattern = rf"{re.escape(str(shard))}: member {re.escape(name)} at byte {offset} does not decode"
    with pytest.raises(CorruptShardError, match=pattern):
        keys(DatasetReader(str(root)))
    with pytest.raises(CorruptShardError, match=pattern):
        list(DatasetReader(str(root)).samples())
    index = ShardDataset(str(root))  # indexing reads headers only; the sample fails when read
    with pytest.raises(CorruptShardError, match=pattern):
        index[0]

    reader = DatasetReader(str(root), on_error="skip")
    with caplog.at_level("WARNING"):
        got = keys(reader)
    assert len(got) == 9 and name.split(".")[0] not in got and reader.skipped == {"corrupt_sample": 1}
    assert sum(name in r.message for r in caplog.records) == 1
    assert len(list(DatasetReader(str(root), on_error="skip").samples())) == 9
    skipping = ShardDataset(str(root), on_error="skip")
    assert skipping[0]["key"] == skipping.key(1) and skipping.skipped == {"corrupt_sample": 1}


def test_skips_in_dataloader_workers_are_counted_in_the_parent(ds):
    root, shard = ds
    data = bytearray(shard.read_bytes())
    for name, offset, size in members(shard):
        if name.endswith(".mask.png"):
            data[offset:offset + size] = bytes(size)  # every mask of the first shard
    shard.write_bytes(bytes(data))
    reader = DatasetReader(str(root), on_error="skip")
    loader = DataLoader(reader, batch_size=4, num_workers=2, collate_fn=collate_list)
    assert sum(len(b) for b in loader) == 5 and reader.skipped == {"corrupt_sample": 5}


def test_a_missing_shard_names_the_manifest_and_the_fix(ds):
    root, shard = ds
    shard.unlink()
    for read in (lambda: list(DatasetReader(str(root), split="train").samples()), lambda: ShardDataset(str(root))):
        with pytest.raises(CorruptShardError) as err:
            read()
        msg = str(err.value)
        assert f"{root / 'manifest.parquet'} lists samples in {shard}, which does not exist" in msg
        assert "re-run the stage that wrote" in msg and err.value.reason == "missing_shard"
    indexed = ShardDataset(str(root), on_error="skip")
    assert len(indexed) == 5 and indexed.skipped == {"missing_shard": 1}


def test_a_sample_missing_from_an_intact_shard_is_counted_under_skip(ds):
    root, shard = ds
    with tarfile.open(shard) as tf:  # rewrite the shard without its last sample (3 members)
        kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers()[:-3]]
    with tarfile.open(shard, "w") as tf:
        for info, data in kept:
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(StorageError, match="1 samples of the manifest are not in their shards"):
        ShardDataset(str(root))
    indexed = ShardDataset(str(root), on_error="skip")
    assert len(indexed) == 9 and indexed.skipped == {"missing_sample": 1}


@pytest.mark.parametrize("bad", ["../evil.png", "/etc/x.png", "a/../../b.meta.json"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_unsafe_member_names_are_refused_under_both_policies(ds, bad, on_error):
    root, _ = ds
    evil = root / "shards" / "phantom-000009.tar"
    with tarfile.open(evil, "w") as tf:
        for name in ("ok-0.meta.json", bad):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(UnsafeMemberError) as err:
        keys(DatasetReader(str(root), on_error=on_error))
    assert str(evil) in str(err.value) and repr(bad) in str(err.value) and "refused" in str(err.value)
