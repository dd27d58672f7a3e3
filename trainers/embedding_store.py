"""What a frozen encoder makes of a task's examples, kept on each node's local disk and shared by
its ranks, instead of held in every rank's memory (``EmbeddingCacheConfig``, ``cached_embeddings``).

- **Stores.** ``<dir>/<key digest>/`` holds the embeddings of one encoder: the caller's key (its
  weights' identity and the preprocessing) plus the dtype and the row shape, written to the
  store's ``store.json``. A store holds builds: ``<build>.rows`` (the rows, raw, one after the
  other) and ``<build>.index.json`` (the identity of each row). A build counts only once its index
  exists, and the index is written last, under a temporary name renamed into place, after the rows
  are flushed: an interrupted build is never read (its rows file is removed a day later).
- **Identities.** The caller names each example by its input (SAM: dataset uri, sample key and
  the sha256 of the image's bytes). Reuse is per example: what any earlier build holds, from any
  job and any set, is read from there, and only the examples no build holds are encoded, into one
  new build. Two jobs building at once on one node write two builds under unique names.
- **Building**, once per node: the ranks are grouped by hostname and the lowest rank of a node
  leads. The leader reads the store, plans and creates the build's rows file; every rank of the
  node encodes a contiguous block of the missing examples and writes its rows into that file
  (``os.pwrite``); after a barrier the leader flushes it and publishes the index. Every node builds
  its own copy: no embedding crosses the network.
- **Reading** (``StoredEmbeddings``): one ``os.pread`` per row into a fresh buffer. The rows stay
  in the node's page cache, shared by its processes, and out of each rank's resident memory (an
  mmap's touched pages would count in the RSS of every process that reads them), so a rank's
  memory does not grow with the set. It pickles as file paths and two index arrays, and each
  process opens the files itself (DataLoader workers).

``in_memory: true`` keeps the older way: every rank holds every row (``task.encode_once``), in
the same dtype, so the numbers do not depend on where the rows are kept.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import field_validator

from sonosynth.datasets.shards import plan_hash
from sonosynth.infra.config import Config
from sonosynth.trainers.task import WorkerContext, encode_once

STORE_VERSION = 1
"""Layout of a store's files; part of every store's key."""
STALE_BUILD_S = 24 * 3600
"""A rows file without an index, untouched this long, is an interrupted build: the next build removes it."""
INDEX_SUFFIX = ".index.json"


class EmbeddingCacheConfig(Config):
    """Where and how the embeddings of a frozen encoder are kept."""

    dir: str | None = None
    """Local folder of the embedding stores, on each node's own disk (every node builds its own
    copy); null: $SONOSYNTH_CACHE_DIR/embeddings, else ~/.cache/sonosynth/embeddings. Stores are
    reused by every later job with the same encoder, preprocessing and dtype."""
    dtype: Literal["float16", "float32"] = "float16"
    """Precision the embeddings are kept in (float16 halves the disk and page cache; a SAM ViT-B
    embedding is 2 MB); the model reads them as float32."""
    in_memory: bool = False
    """Hold every embedding in every rank's memory instead (the older way; memory grows with the
    set: ViT-B, 2 GB per rank per 1,000 images in float16)."""

    @field_validator("dir")
    @classmethod
    def _local(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("embedding_cache.dir is empty; give a local folder, or null for the default")
        if v is not None and "://" in v:
            raise ValueError(f"embedding_cache.dir {v!r} is not a local folder: embeddings are read row by row at "
                             "every step from each node's own disk; give a local path (e.g. /tmp/sonosynth-embeddings) "
                             "or null for $SONOSYNTH_CACHE_DIR/embeddings")
        return v

    def root(self) -> Path:
        """The folder the stores are in."""
        if self.dir:
            return Path(self.dir).expanduser().absolute()
        base = os.environ.get("SONOSYNTH_CACHE_DIR")
        return Path(base) / "embeddings" if base else Path.home() / ".cache" / "sonosynth" / "embeddings"


@dataclass
class CacheReport:
    """What one set's embeddings came from (on this rank's node), for lineage."""

    store: str | None
    """The store's key digest (None: held in memory)."""
    dtype: str
    reused: int
    """Examples read from earlier builds."""
    encoded: int
    """Examples encoded for this set (on this node)."""

    def lineage(self) -> dict[str, Any]:
        return {"store": self.store, "dtype": self.dtype, "reused_images": self.reused,
                "encoded_images": self.encoded}


class HeldEmbeddings:
    """Every row in memory (``in_memory: true``), kept in the cache's dtype, read as float32."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i].float()


class StoredEmbeddings:
    """Row ``i`` of a set is row ``rows[i]`` of ``files[file_of[i]]``, read with one ``os.pread``
    into a fresh buffer (see the module's docstring), as a float32 tensor."""

    def __init__(self, files: Sequence[str], file_of: np.ndarray, rows: np.ndarray, dtype: str,
                 shape: Sequence[int]):
        self.files, self.file_of, self.rows = list(files), file_of, rows
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._fds: tuple[int, dict[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _fd(self, f: int) -> int:
        if self._fds is None or self._fds[0] != os.getpid():  # a forked worker opens its own
            self._fds = (os.getpid(), {})
        fds = self._fds[1]
        if f not in fds:
            fds[f] = os.open(self.files[f], os.O_RDONLY)
        return fds[f]

    def __getitem__(self, i: int) -> torch.Tensor:
        f, row = int(self.file_of[i]), int(self.rows[i])
        data = os.pread(self._fd(f), self.row_bytes, row * self.row_bytes)
        if len(data) != self.row_bytes:
            raise RuntimeError(f"{self.files[f]} ends before row {row}: the embedding store changed while in use; "
                               f"delete {Path(self.files[f]).parent} and run again")
        return torch.from_numpy(np.frombuffer(data, self.dtype).reshape(self.shape).astype(np.float32))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": None}

    def close(self) -> None:
        if self._fds is not None and self._fds[0] == os.getpid():
            for fd in self._fds[1].values():
                os.close(fd)
        self._fds = None


@dataclass
class _Plan:
    """A node leader's plan for one set, sent to the ranks of its node."""

    folder: str
    dtype: str
    shape: tuple[int, ...]
    files: list[str]
    file_of: np.ndarray
    rows: np.ndarray
    missing: list[int] = field(default_factory=list)
    """Examples to encode, in the order of their rows in the new build (the last of ``files``)."""
    build: str | None = None
    ids: list[str] = field(default_factory=list)
    """Identity digests of the new build's rows."""

    def reader(self) -> StoredEmbeddings:
        return StoredEmbeddings(self.files, self.file_of, self.rows, self.dtype, self.shape)


def cached_embeddings(ctx: WorkerContext, cfg: EmbeddingCacheConfig, *, n: int, row_shape: Sequence[int],
                      key: Callable[[], dict[str, Any]], identities: Callable[[], Sequence[str]],
                      load: Callable[[int], torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor],
                      chunk: int = 8) -> tuple[StoredEmbeddings | HeldEmbeddings, CacheReport]:
    """The embeddings of examples ``0..n-1`` (``encode`` of up to ``chunk`` stacked ``load(i)`` on
    the rank's device; one tensor with a ``row_shape`` row per example), each encoded once per node,
    and what they came from. ``key()`` names the encoder and preprocessing, ``identities()`` each
    example's input; both are called on node leaders only. Every rank must call this together."""
    if n < 1:
        raise ValueError("cached_embeddings needs at least one example")
    dtype = cfg.dtype
    if cfg.in_memory:
        rows = encode_once(ctx, n, load, encode, chunk, dtype=getattr(torch, dtype))
        return HeldEmbeddings(rows), CacheReport(None, dtype, 0, n)
    node = ctx.node_ranks()
    leader = node[0]
    plan: _Plan | str | None = None
    error: Exception | None = None
    if ctx.rank == leader:
        try:
            plan = _plan(cfg, key(), list(identities()), n, tuple(row_shape))
        except Exception as err:  # told to the node's ranks, which would otherwise wait for a plan
            plan, error = f"{type(err).__name__}: {err}", err
    plan = ctx.all_gather(plan)[leader]
    if isinstance(plan, str):
        raise RuntimeError(f"rank {leader} could not plan the embedding store under {cfg.root()}: {plan}") from error
    failed = None
    if plan.build is not None:
        block = np.array_split(np.arange(len(plan.missing)), len(node))[node.index(ctx.rank)]
        try:
            _encode_into(ctx, plan, block, load, encode, chunk)
        except Exception as err:  # every rank stops, none waits for rows that will not come
            failed, error = f"rank {ctx.rank}: {type(err).__name__}: {err}", err
    failures = [f for f in ctx.all_gather(failed) if f]  # and every row of every node's build is written
    if failures:
        raise RuntimeError(f"embedding {len(plan.missing)} examples into {plan.files[-1]} failed on "
                           f"{'; '.join(failures)}") from error
    if ctx.rank == leader and plan.build is not None:
        _publish(plan)
    ctx.barrier()  # and published
    return plan.reader(), CacheReport(Path(plan.folder).name, dtype, n - len(plan.missing), len(plan.missing))


def _plan(cfg: EmbeddingCacheConfig, key: dict[str, Any], identities: list[str], n: int,
          shape: tuple[int, ...]) -> _Plan:
    """Leader: find each example's row in the store's builds; create the new build for the rest."""
    if len(identities) != n:
        raise ValueError(f"{len(identities)} identities for {n} examples")
    full_key = {**key, "dtype": cfg.dtype, "shape": list(shape), "store_version": STORE_VERSION}
    folder = cfg.root() / plan_hash(full_key)[:24]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "store.json").is_file():
        _write_atomic(folder / "store.json", full_key)
    ids = [plan_hash(i)[:32] for i in identities]
    wanted, where, files = set(ids), {}, []
    row_bytes = int(np.prod(shape)) * np.dtype(cfg.dtype).itemsize
    for index in sorted(folder.glob(f"*{INDEX_SUFFIX}")):
        build = _read_index(index, row_bytes)
        if build is None:
            continue
        found = {i: r for r, i in enumerate(build["ids"]) if i in wanted and i not in where}
        if found:
            where.update({i: (len(files), r) for i, r in found.items()})
            files.append(str(folder / build["rows_file"]))
    missing = [e for e, i in enumerate(ids) if i not in where]
    plan = _Plan(str(folder), cfg.dtype, shape, files, np.zeros(n, np.int32), np.zeros(n, np.int64), missing)
    for e, i in enumerate(ids):
        if i in where:
            plan.file_of[e], plan.rows[e] = where[i]
    if missing:
        _remove_stale_builds(folder)
        plan.build = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        plan.ids = [ids[e] for e in missing]
        rows_path = folder / f"{plan.build}.rows"
        fd = os.open(rows_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.ftruncate(fd, len(missing) * row_bytes)  # sparse until the ranks write their rows
        os.close(fd)
        plan.file_of[missing], plan.rows[missing] = len(files), np.arange(len(missing))
        files.append(str(rows_path))
    return plan


def _read_index(path: Path, row_bytes: int) -> dict[str, Any] | None:
    """A complete build's index, or None (unreadable, or its rows file is not the size it says)."""
    try:
        build = json.loads(path.read_text())
        size = (path.parent / build["rows_file"]).stat().st_size
    except (OSError, ValueError, KeyError):
        return None
    return build if size == len(build["ids"]) * row_bytes else None


def _encode_into(ctx: WorkerContext, plan: _Plan, block: np.ndarray, load, encode, chunk: int) -> None:
    """This rank's block of the new build's rows: encode them and write them where they belong."""
    dtype = getattr(torch, plan.dtype)
    row_bytes = int(np.prod(plan.shape)) * np.dtype(plan.dtype).itemsize
    fd = os.open(plan.files[-1], os.O_WRONLY)
    try:
        with torch.no_grad():
            for start in range(0, len(block), chunk):
                rows = block[start:start + chunk]
                out = encode(torch.stack([load(plan.missing[r]) for r in rows]).to(ctx.device))
                if tuple(out.shape) != (len(rows), *plan.shape):
                    raise ValueError(f"the encoder gave {tuple(out.shape)} for {len(rows)} examples; the store "
                                     f"expects rows of {plan.shape}")
                data = memoryview(out.detach().to(dtype).cpu().contiguous().numpy()).cast("B")
                offset, done = int(rows[0]) * row_bytes, 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], offset + done)
    finally:
        os.close(fd)


def _publish(plan: _Plan) -> None:
    """Leader: flush the new build's rows, then write its index (the build is complete from then on)."""
    rows_path = Path(plan.files[-1])
    fd = os.open(rows_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _write_atomic(Path(plan.folder) / f"{plan.build}{INDEX_SUFFIX}",
                  {"rows_file": rows_path.name, "dtype": plan.dtype, "shape": list(plan.shape), "ids": plan.ids,
                   "host": socket.gethostname(), "created": time.time()})


def _write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _remove_stale_builds(folder: Path) -> None:
    """Rows files of interrupted builds (no index, untouched for ``STALE_BUILD_S``)."""
    now = time.time()
    for rows in folder.glob("*.rows"):
        index = rows.with_name(rows.name[:-len(".rows")] + INDEX_SUFFIX)
        try:
            if not index.exists() and now - rows.stat().st_mtime > STALE_BUILD_S:
                rows.unlink()
        except FileNotFoundError:
            pass
