"""Map-style access to sonosynth datasets: ``ShardDataset`` and exact-count mixes.

``ShardDataset(uri, split=..., keys=...)`` indexes the shards that hold the wanted samples
(key -> shard, byte offset and size of each member, from the tar headers) and reads one
sample with one ``os.pread`` of its members, so it works with any sampler and inside
DataLoader workers (file handles are opened per process; ``pread`` has no shared file
position). ``s3://`` shards are downloaded once into a local cache, named by the sha256 in
their completion record (``_done/``), so they are reused across runs and verified; a shard
without a record is fetched once per process. Items are the streaming reader's:
{key, image: uint8 [1,H,W], mask: uint8 [1,H,W] or None, meta: dict}.

Damaged inputs follow ``on_error`` (``reader.ReaderConfig``): with ``raise`` a shard the
manifest lists that is missing, a truncated shard, a sample the manifest lists that its shard
lacks, or a member that does not decode is a ``CorruptShardError`` naming the shard, the byte
offset and the member. With ``skip`` the first three leave those samples out of the index and a
damaged sample is replaced by the next readable one (``ds[i+1]``, wrapping), each logged once
per shard and counted in ``skipped``. Members named with ``..`` or an absolute path are refused.

``mix_indexed`` takes exact counts (``mix.choose``: the same keys ``reader.mix`` picks for the
same seed) from several datasets; ratios are for streaming (``reader.mix``). Named training
mixes are ``sonosynth.datasets.mix``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from sonosynth.datasets.manifest import missing_shard, read_manifest
from sonosynth.datasets.mix import choose
from sonosynth.datasets.reader import PixelArena, Skips, add_skipped, corrupt_member, decode_item
from sonosynth.datasets.records import MemberError, decode_member
from sonosynth.datasets.shards import ShardRecord, done_key
from sonosynth.datasets.tario import CorruptShardError, OnError, check_on_error, split_name, tar_members
from sonosynth.infra.storage import LocalStorage, ObjectNotFound, Storage, StorageConfig, open_storage

MAX_OPEN_SHARDS = 64
"""Shard files one process keeps open at most."""
_FETCHED: set[str] = set()
"""Cache files this process has downloaded (or verified) already."""

# Columns of ShardDataset's index, one row per sample; offsets relative to START, LEN -1 = absent.
SHARD, START, SPAN, IMAGE, IMAGE_LEN, MASK, MASK_LEN, META, META_LEN = range(9)
_MEMBERS = {"image.png": IMAGE, "mask.png": MASK, "meta.json": META}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SONOSYNTH_CACHE_DIR") or Path.home() / ".cache" / "sonosynth" / "shards")


def cached_shard(storage: Storage, shard: str, cache_dir: str | Path | None = None) -> Path:
    """A local file with the bytes of ``shard``: the file itself for a local dataset, else a
    download into ``cache_dir`` (written under a temporary name, renamed when complete). A shard
    that does not exist is a ``CorruptShardError`` (reason ``missing_shard``) naming the manifest."""
    if isinstance(storage, LocalStorage):
        if not storage.exists(shard):
            raise missing_shard(storage, shard)
        return Path(storage.uri) / shard
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    record = ShardRecord.load(storage, done_key(shard))
    digest = record.sha256 if record is not None and record.shard == shard else None
    by_url = f"{hashlib.sha256(storage.url(shard).encode()).hexdigest()[:24]}-{Path(shard).name}"
    path = root / (f"{digest}.tar" if digest else by_url)
    if str(path) in _FETCHED or (digest and path.is_file()):
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sha = hashlib.sha256()
    try:
        stream = storage.open_read(shard)
    except ObjectNotFound:
        raise missing_shard(storage, shard) from None
    try:
        with open(tmp, "wb") as out:
            while chunk := stream.read(1 << 20):
                sha.update(chunk)
                out.write(chunk)
        if digest and sha.hexdigest() != digest:  # the record is stale: keep the bytes, by URL
            path = root / by_url
        os.replace(tmp, path)
    finally:
        stream.close()
        tmp.unlink(missing_ok=True)
    _FETCHED.add(str(path))
    return path


class ShardDataset(Dataset):
    """One sonosynth dataset (folder or s3:// prefix) as a map-style torch Dataset, in key order."""

    def __init__(self, uri: str, *, split: str | None = None, keys: Sequence[str] | None = None,
                 storage: StorageConfig | None = None, cache_dir: str | Path | None = None,
                 on_error: OnError = "raise"):
        """``split`` and ``keys`` select samples by the manifest; keys not in it (or not in the
        split) are left out. ``cache_dir`` holds downloaded s3:// shards (default
        $SONOSYNTH_CACHE_DIR or ~/.cache/sonosynth/shards). ``on_error``: see the module's docstring."""
        store = open_storage(uri, storage)
        self.uri, self.split, self.storage_config = store.uri, split, storage or StorageConfig()
        self.on_error, self.skips = check_on_error(on_error), Skips()
        table = read_manifest(store).to_pydict()
        asked = set(keys) if keys is not None else None
        masks = table.get("has_mask") or [None] * len(table["key"])
        rows = sorted((k, s, bool(m)) for k, s, sp, m in zip(table["key"], table["shard"], table["split"], masks)
                      if (asked is None or k in asked) and (split is None or sp == split))
        self.paths: list[str] = []
        self.urls: list[str] = []
        for shard in sorted({s for _, s, _ in rows}):
            try:
                self.paths.append(str(cached_shard(store, shard, cache_dir)))
                self.urls.append(store.url(shard))
            except CorruptShardError as err:
                self.skips.handle(err, self.on_error)
        members = self._scan({k for k, _, _ in rows})
        gone = {e.shard for e in self.skips.events}  # shards missing or cut short (already counted)
        missing = [(k, store.url(s)) for k, s, has_mask in rows if not _complete(members.get(k), has_mask)]
        self._drop_missing([(k, url) for k, url in missing if url not in gone])
        dropped = {k for k, _ in missing}
        self._keys = [k for k, _, _ in rows if k not in dropped]
        self.index = np.array([_row(*members[k]) for k in self._keys], dtype=np.int64).reshape(-1, 9)
        self._files: dict[int, Any] = {}
        self._arena: tuple[int, PixelArena] | None = None

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} of what ``on_error: skip`` left out (``reader.SKIP_REASONS``), workers included."""
        return self.skips.totals()

    def _scan(self, wanted: set[str]) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
        found: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
        for i, (path, url) in enumerate(zip(self.paths, self.urls)):
            with open(path, "rb") as fh:
                try:
                    for name, offset, size, _ in tar_members(fh, data=False, where=url):
                        parts = split_name(name)
                        if parts is not None and parts[0] in wanted:
                            found.setdefault(parts[0], (i, {}))[1][parts[1]] = (offset, size)
                except CorruptShardError as err:
                    self.skips.handle(err, self.on_error)
                    broken = split_name(err.member or "")
                    if broken is not None:  # the sample it broke in is not whole
                        found.pop(broken[0], None)
        return found

    def _drop_missing(self, missing: list[tuple[str, str]]) -> None:
        """Samples the manifest lists that their (intact) shards lack: an error, or each skipped."""
        if missing and self.on_error == "raise":
            raise CorruptShardError(
                f"{self.uri}: {len(missing)} samples of the manifest are not in their shards (e.g. "
                f"{[k for k, _ in missing[:3]]} in {missing[0][1]}); the dataset is incomplete: re-run the stage "
                "that wrote it, or read past them with the reader's on_error: skip",
                shard=missing[0][1], reason="missing_sample", member=missing[0][0])
        for key, url in missing:
            self.skips.handle(CorruptShardError(f"{url}: sample {key} of the manifest is not in this shard (or "
                                                "lacks image.png, meta.json or its mask.png)", shard=url,
                                                reason="missing_sample", member=key), self.on_error)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        """Sample keys, in index order (sorted)."""
        return list(self._keys)

    def key(self, i: int) -> str:
        return self._keys[i]

    def _read(self, shard: int, start: int, length: int) -> bytes:
        fh = self._files.get(shard)
        if fh is None:
            if len(self._files) >= MAX_OPEN_SHARDS:  # the longest-open one goes (dicts keep insertion order)
                self._files.pop(next(iter(self._files))).close()
            fh = self._files[shard] = open(self.paths[shard], "rb", buffering=0)
        data = os.pread(fh.fileno(), length, start)
        if len(data) != length:
            raise CorruptShardError(
                f"{self.urls[shard]}: is truncated at byte {start + len(data)} (the index needs bytes {start} to "
                f"{start + length}; local file {self.paths[shard]}): it changed since it was indexed; open the "
                "dataset again", shard=self.urls[shard], reason="truncated_shard", offset=start + len(data))
        return data

    def meta(self, i: int) -> dict[str, Any]:
        """meta.json of sample ``i``, without decoding its images (a damaged one is an error under any policy)."""
        row = self.index[i].tolist()
        try:
            return decode_member(self._keys[i], "meta.json",
                                 self._read(row[SHARD], row[START] + row[META], row[META_LEN]), json.loads)
        except MemberError as err:
            raise corrupt_member(err, self.urls[row[SHARD]], row[START] + row[META]) from None

    def metas(self) -> list[dict[str, Any]]:
        return [self.meta(i) for i in range(len(self))]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i``; under ``on_error: skip`` a damaged one is counted and the next readable one
        (``i+1``, ``i+2``, ... wrapping) comes instead."""
        n = len(self)
        i = i + n if i < 0 else i
        for j in [i] + [(i + step) % n for step in range(1, n)]:
            try:
                return self._item(j)
            except CorruptShardError as err:
                self.skips.handle(err, self.on_error)
        raise CorruptShardError(f"{self.uri}: no sample of this selection decodes (the warnings above name them); "
                                "rewrite the dataset", shard=self.uri, reason="unreadable")

    def _item(self, i: int) -> dict[str, Any]:
        shard, start, span, image, image_len, mask, mask_len, meta, meta_len = self.index[i].tolist()
        data = self._read(shard, start, span)
        pid = os.getpid()
        if self._arena is None or self._arena[0] != pid:  # one per process: shared blocks in workers
            self._arena = (pid, PixelArena())
        try:
            return decode_item(self._keys[i], data[image:image + image_len],
                               data[mask:mask + mask_len] if mask_len >= 0 else None,
                               data[meta:meta + meta_len], self._arena[1])
        except MemberError as err:
            offset = {"image.png": image, "mask.png": mask, "meta.json": meta}[err.ext]
            raise corrupt_member(err, self.urls[shard], start + offset) from None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}, "_arena": None}

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def _complete(found: tuple[int, dict[str, tuple[int, int]]] | None, has_mask: bool) -> bool:
    """A sample's members are all in its shard: image, meta and (when the manifest says so) mask."""
    return found is not None and {"image.png", "meta.json", *(["mask.png"] if has_mask else [])} <= found[1].keys()


def _row(shard: int, members: dict[str, tuple[int, int]]) -> list[int]:
    used = [members[m] for m in _MEMBERS if m in members]
    start = min(o for o, _ in used)
    row = [shard, start, max(o + n for o, n in used) - start, 0, -1, 0, -1, 0, -1]
    for name, col in _MEMBERS.items():
        if name in members:
            row[col], row[col + 1] = members[name][0] - start, members[name][1]
    return row


class IndexedMix(Dataset):
    """The concatenation of chosen samples of several ShardDatasets."""

    def __init__(self, parts: list[tuple[ShardDataset, np.ndarray]]):
        self.parts = parts
        self._ends = np.cumsum([len(chosen) for _, chosen in parts]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, i: int) -> tuple[ShardDataset, int]:
        """(dataset, index in it) of mixed sample ``i``."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a mix of {len(self)} samples")
        p = bisect.bisect_right(self._ends, i)
        return self.parts[p][0], int(self.parts[p][1][i - (self._ends[p - 1] if p else 0)])

    def __getitem__(self, i: int) -> dict[str, Any]:
        ds, j = self.locate(i)
        return ds[j]

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} of what its datasets skipped (``on_error: skip``)."""
        return add_skipped(ds.skipped for ds, _ in self.parts)

    def keys(self) -> list[str]:
        return [ds.key(int(j)) for ds, chosen in self.parts for j in chosen]

    def meta(self, i: int) -> dict[str, Any]:
        ds, j = self.locate(i)
        return ds.meta(j)


def mix_indexed(datasets: list[ShardDataset], *, counts: Sequence[int | None] | None = None,
                seed: int = 0) -> IndexedMix:
    """Exactly ``counts[i]`` samples of ``datasets[i]`` (None: all of them), chosen by
    ``mix.choose`` (salted by the position ``i``): the keys ``reader.mix`` picks for the same seed."""
    counts = list(counts) if counts is not None else [None] * len(datasets)
    if len(counts) != len(datasets):
        raise ValueError(f"mix_indexed got {len(datasets)} datasets and {len(counts)} counts; give one "
                         "count per dataset (None takes all of it)")
    parts = []
    for i, (ds, count) in enumerate(zip(datasets, counts)):
        if count is None:
            chosen = np.arange(len(ds))
        elif not 0 <= count <= len(ds):
            raise ValueError(f"{ds.uri} has {len(ds)} samples in split {ds.split!r}; count {count} "
                             f"{'asks for more' if count > 0 else 'is negative'}. Lower the count.")
        else:
            chosen = np.searchsorted(ds.keys(), choose(ds.keys(), count, seed, i)).astype(np.int64)
        parts.append((ds, chosen))
    return IndexedMix(parts)
