"""Stream sonosynth datasets (local or S3) into torch, and mix several by count or ratio.

``DatasetReader`` is a torch ``IterableDataset``: shards are divided among ranks
(``torch.distributed``) and DataLoader workers, streamed through the storage layer (no
local copy), optionally shuffled (shard order plus a buffer of still-encoded records,
reseeded per epoch by ``set_epoch``), filtered by split or by key (from the manifest, before
anything is decoded), and decoded to tensors. ``mix`` combines readers: ``counts`` takes
exactly that many samples from each dataset (a seeded choice from its manifest, e.g. 20 real
+ 495 synthetic), ``ratios`` draws from each with those probabilities until the first is
exhausted. For map-style access (a sampler, exact counts) see ``sonosynth.datasets.indexed``.

Damaged inputs (``ReaderConfig.on_error``): a truncated shard, a member that does not decode,
or a shard the manifest lists that storage lacks is a ``CorruptShardError`` naming the shard's
URL, the byte offset and the member (``raise``, the default), or is left out, logged once per
shard and counted in ``reader.skipped`` (``skip``). Members named with ``..`` or an absolute
path are refused under both.

The hot path is lean on purpose (issue 13): tar headers are parsed here (``tar_members``,
1 MiB reads) rather than by ``tarfile`` and WebDataset's per-sample stages, each PNG is
decoded once, and inside a DataLoader worker the pixels of consecutive samples are packed
into one shared-memory block (``PixelArena``), so a batch reaches the main process as one
or two shared blocks instead of two per sample. The shards stay plain WebDataset tars.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sonosynth.datasets.manifest import missing_shard, read_manifest
from sonosynth.datasets.mix import choose
from sonosynth.datasets.records import MemberError, Sample, decode_member, decode_png
from sonosynth.datasets.shards import SHARDS_DIR
from sonosynth.datasets.tario import REWRITE_FIX, CorruptShardError, OnError, check_on_error, tar_records
from sonosynth.datasets.tario import ReaderConfig as ReaderConfig  # the reader's config lives beside its errors
from sonosynth.infra.config import Config
from sonosynth.infra.storage import ObjectNotFound, StorageConfig, StorageError, open_storage

log = logging.getLogger(__name__)
SKIP_REASONS = ("corrupt_sample", "truncated_shard", "missing_shard", "missing_sample")
"""What ``on_error: skip`` counts: a sample with a member that does not decode (one per sample),
a shard cut short (one per shard: its rest is skipped), a shard the manifest lists that is not
there (one per shard), a sample the manifest lists that is not in its intact shard (one per sample)."""


@dataclass(frozen=True)
class Skip:
    """One thing a reader left out under ``on_error: skip``."""

    shard: str
    member: str | None
    offset: int | None
    reason: str
    message: str


class Skips:
    """What a reader skipped. The counts live in an anonymous shared mapping, one row per
    DataLoader worker, so what forked worker processes skip adds up in the parent's reader too
    (a worker started by pickling, e.g. ``spawn``, counts in its own copy); ``events`` (shard,
    member, offset, reason) are this process's. Each shard's first problem is logged with its detail."""

    ROWS = 65

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, self.ROWS * len(SKIP_REASONS) * 8)  # MAP_SHARED: forked workers write here
        self.counts = np.frombuffer(self._map, dtype=np.int64).reshape(self.ROWS, len(SKIP_REASONS))
        self.events: list[Skip] = []
        self.logged: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"counts": self.counts.copy(), "events": self.events, "logged": self.logged}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.counts[:] = state["counts"]
        self.events, self.logged = state["events"], state["logged"]

    def handle(self, err: CorruptShardError, on_error: OnError) -> None:
        """Raise ``err`` (policy 'raise', or a refusal such as an unsafe member name), else count and log it."""
        if on_error != "skip" or err.reason not in SKIP_REASONS:
            raise err
        info = get_worker_info()
        self.counts[(info.id + 1) % self.ROWS if info else 0, SKIP_REASONS.index(err.reason)] += 1
        self.events.append(Skip(err.shard, err.member, err.offset, err.reason, str(err)))
        if err.shard not in self.logged:
            self.logged.add(err.shard)
            log.warning("skipped (on_error: skip; later problems of this shard are only counted): %s", err)

    def totals(self) -> dict[str, int]:
        """{reason: count} over this process and its forked DataLoader workers (reasons with a count only)."""
        return {r: int(n) for r, n in zip(SKIP_REASONS, self.counts.sum(0)) if n}


def corrupt_member(err: MemberError, shard: str, offset: int | None) -> CorruptShardError:
    """A member that is missing or does not decode, as an error naming its shard and byte offset."""
    at = f" at byte {offset}" if offset is not None else ""
    return CorruptShardError(f"{shard}: member {err.member}{at} {err.problem}; {REWRITE_FIX}", shard=shard,
                             reason="corrupt_sample", offset=offset, member=err.member)


def to_tensors(sample: Sample) -> dict[str, Any]:
    """{key, image: uint8 [1,H,W], mask: uint8 [1,H,W] or None, meta}."""
    return {
        "key": sample.key,
        "image": torch.from_numpy(np.array(sample.image, copy=True))[None],
        "mask": torch.from_numpy(np.array(sample.mask, copy=True))[None] if sample.mask is not None else None,
        "meta": sample.meta,
    }


def collate_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep a batch as a list (samples differ in size until a transform resizes them)."""
    return batch


# ---- tar members and WebDataset records, without tarfile ----------------------------------

class PixelArena:
    """Makes the [1,H,W] uint8 tensors of decoded images. Inside a DataLoader worker,
    consecutive ones are views into one shared-memory block (each shared storage costs a file
    descriptor handoff to the main process, which dominated the batch transfer); elsewhere
    each tensor owns its memory. A block lives while any tensor in it does: ``.clone()`` what
    you keep for long."""

    def __init__(self, block_bytes: int = 4 << 20):
        self.block_bytes, self.shared = block_bytes, get_worker_info() is not None
        self.block: torch.Tensor | None = None
        self.used = 0

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        if not self.shared:
            return torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True))[None]
        n = pixels.size
        if self.block is None or self.used + n > self.block.numel():
            self.block, self.used = _shared_block(max(n, self.block_bytes)), 0
        out = self.block[self.used:self.used + n]
        self.used += (n + 63) & ~63
        out.numpy()[:] = pixels.reshape(-1)
        return out.view(1, *pixels.shape)


def _shared_block(nbytes: int) -> torch.Tensor:
    """A uint8 tensor already in shared memory (no move, hence no copy, when it is pickled)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(nbytes), 0, (nbytes,), (1,))


def decode_item(key: str, image: bytes | None, mask: bytes | None, meta: bytes | None,
                arena: PixelArena) -> dict[str, Any]:
    """The reader's item: {key, image: uint8 [1,H,W], mask: uint8 [1,H,W] or None, meta}; a
    MemberError names a member that is missing or does not decode."""
    pixels = decode_member(key, "image.png", image, decode_png)
    mask_pixels = decode_member(key, "mask.png", mask, decode_png) if mask is not None else None
    meta_dict = decode_member(key, "meta.json", meta, json.loads)
    return {"key": key, "image": arena.tensor(pixels),
            "mask": arena.tensor(mask_pixels) if mask_pixels is not None else None, "meta": meta_dict}


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DatasetReader(IterableDataset):
    def __init__(
        self,
        uri: str,
        *,
        split: str | None = None,
        keys: Sequence[str] | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        storage: StorageConfig | None = None,
        distributed: bool = True,
        on_error: OnError = "raise",
    ):
        """``distributed=False`` reads every shard on every rank (small sets each rank needs whole).
        ``on_error``: see ``ReaderConfig``; what was skipped is in ``skipped`` and ``skips.events``."""
        self.uri = uri
        self.on_error = check_on_error(on_error)
        self.skips = Skips()
        self.distributed = distributed
        self.split = split
        self.keys = set(keys) if keys is not None else None
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.transform = transform
        self.storage_config = storage or StorageConfig()
        self.wanted: frozenset[str] | None = None
        """Keys to yield (from the manifest), or None for every sample of the shards."""
        self.shards = self._find_shards()

    def _find_shards(self) -> list[str]:
        storage = open_storage(self.uri, self.storage_config)
        if self.keys is not None or self.split is not None:
            table = read_manifest(storage).to_pydict()
            rows = [(k, s) for k, s, sp in zip(table["key"], table["shard"], table["split"])
                    if (self.keys is None or k in self.keys) and (self.split is None or sp == self.split)]
            self.wanted = frozenset(k for k, _ in rows)
            return sorted({s for _, s in rows})
        shards = [k for k in storage.list(f"{SHARDS_DIR}/") if k.endswith(".tar")]
        if not shards:
            raise StorageError(f"{storage.uri} has no {SHARDS_DIR}/*.tar: is it a sonosynth dataset?")
        return shards

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples this reader yields in one pass over all ranks and workers (from the manifest)."""
        if self.wanted is not None:
            return len(self.wanted)
        return len(read_manifest(open_storage(self.uri, self.storage_config)).column("key"))

    def _my_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.shuffle_buffer:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)
        rank, world = _rank_and_world() if self.distributed else (0, 1)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return shards[rank * workers + worker::world * workers]

    def _storage(self):
        """This process's storage client (an S3 client is made once per process, not per epoch)."""
        cached = self.__dict__.get("_client")
        if cached is None or cached[0] != os.getpid():
            cached = self._client = (os.getpid(), open_storage(self.uri, self.storage_config))
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_client"}

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} of what ``on_error: skip`` left out (``SKIP_REASONS``), DataLoader workers included."""
        return self.skips.totals()

    def records(self) -> Iterator[dict[str, Any]]:
        """Raw WebDataset records (bytes per extension) of this worker's wanted samples."""
        for record in self._records():
            record.pop("__offsets__", None)
            yield record

    def _records(self) -> Iterator[dict[str, Any]]:
        """As ``records``, each with "__offsets__" (the byte offset of each member), under ``on_error``."""
        storage = self._storage()
        for shard in self._my_shards():
            try:
                stream = storage.open_read(shard)
            except ObjectNotFound:
                self.skips.handle(missing_shard(storage, shard), self.on_error)
                continue
            try:
                for record in tar_records(stream, storage.url(shard), offsets=True):
                    if self.wanted is None or record["__key__"] in self.wanted:
                        yield record
            except CorruptShardError as err:
                self.skips.handle(err, self.on_error)
            finally:
                stream.close()

    def _decoded(self, record: dict[str, Any], decode: Callable[[dict[str, Any]], Any]) -> Any:
        """``decode(record)``, or None when a member is damaged and ``on_error`` is skip."""
        try:
            return decode(record)
        except MemberError as err:
            offset = record.get("__offsets__", {}).get(err.ext)
            self.skips.handle(corrupt_member(err, record["__url__"], offset), self.on_error)
            return None

    def samples(self) -> Iterator[Sample]:
        """Decoded samples (numpy arrays), in shard order, with no shuffling."""
        for record in self._records():
            sample = self._decoded(record, Sample.from_wds)
            if sample is not None:
                yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        records = self._records()
        if self.shuffle_buffer > 1:  # shuffled before decoding: the buffer holds PNG bytes
            records = _buffer_shuffle(records, self.shuffle_buffer, random.Random(f"{self.seed}:{self.epoch}:b"))
        arena = PixelArena()

        def decode(r: dict[str, Any]) -> dict[str, Any]:
            return decode_item(r["__key__"], r.get("image.png"), r.get("mask.png"), r.get("meta.json"), arena)

        for record in records:
            item = self._decoded(record, decode)
            if item is not None:
                yield self.transform(item) if self.transform else item


def add_skipped(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """The sum of several readers' ``skipped`` counts."""
    total: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            total[reason] = total.get(reason, 0) + n
    return total


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class DataSource(Config):
    """One dataset in a training mix."""

    uri: str
    """Dataset folder or s3:// prefix (written by ingest or generate)."""
    split: str | None = "train"
    """Only samples of this split (null for all)."""
    count: int | None = None
    """Take exactly this many samples (seeded choice from the manifest)."""
    ratio: float | None = None
    """Draw from this dataset with this relative weight."""


class MixedReader(IterableDataset):
    """Interleaves readers: each next sample comes from reader i with probability w_i."""

    def __init__(self, readers: list[DatasetReader], weights: list[float], seed: int = 0,
                 stop: str = "all"):
        if len(readers) != len(weights) or not readers:
            raise ValueError("mix needs one weight per dataset")
        self.readers, self.weights, self.seed, self.stop, self.epoch = readers, weights, seed, stop, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for r in self.readers:
            r.set_epoch(epoch)

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} skipped by all the mixed readers."""
        return add_skipped(r.skipped for r in self.readers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{info.id if info else 0}")
        live = [(iter(r), w) for r, w in zip(self.readers, self.weights)]
        while live:
            i = rng.choices(range(len(live)), weights=[w for _, w in live])[0]
            try:
                yield next(live[i][0])
            except StopIteration:
                if self.stop == "first":
                    return
                live.pop(i)


def mix(sources: list[DataSource], *, shuffle_buffer: int = 256, seed: int = 0,
        transform=None, storage: StorageConfig | None = None, on_error: OnError = "raise") -> IterableDataset:
    """One stream from several datasets: all with ``count`` or all with ``ratio`` (``on_error``:
    see ``ReaderConfig``; each reader counts its own skips)."""
    by_count = [s.count is not None for s in sources]
    by_ratio = [s.ratio is not None for s in sources]
    if not (all(by_count) or all(by_ratio)):
        raise ValueError("give every data source a count, or every data source a ratio "
                         "(e.g. real count 20 + synthetic count 495)")
    readers, weights = [], []
    for i, src in enumerate(sources):
        keys = None
        if src.count is not None:
            table = read_manifest(open_storage(src.uri, storage)).to_pydict()
            pool = sorted(k for k, sp in zip(table["key"], table["split"])
                          if src.split is None or sp == src.split)
            if src.count > len(pool):
                raise ValueError(f"{src.uri} has {len(pool)} samples in split {src.split!r}; "
                                 f"count {src.count} asks for more. Lower the count.")
            keys = choose(pool, src.count, seed, i)
        readers.append(DatasetReader(src.uri, split=src.split, keys=keys, shuffle_buffer=shuffle_buffer,
                                     seed=seed + i, transform=transform, storage=storage, on_error=on_error))
        weights.append(float(src.count if src.count is not None else src.ratio))
    if len(readers) == 1:
        return readers[0]
    return MixedReader(readers, weights, seed, stop="all" if all(by_count) else "first")
