"""Shard writing with atomic publication and per-shard completion records.

A shard ``shards/<name>-%06d.tar`` is built in a local temporary file with WebDataset's
TarWriter (fixed mtime and owner, so the same samples give the same bytes) and then
published with one atomic storage put. Its completion record ``_done/<name>-%06d.json``
is written after it, holding the plan hash, the tar's sha256 and the shard's manifest
rows: a job that finds a record with its own plan hash skips that shard, which makes
re-runs resumable and exactly-once.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import webdataset as wds

from sonosynth.datasets.records import Sample
from sonosynth.infra.storage import ObjectNotFound, Storage

SHARDS_DIR = "shards"
DONE_DIR = "_done"


def shard_key(name: str, index: int) -> str:
    return f"{SHARDS_DIR}/{name}-{index:06d}.tar"


def done_key(shard: str) -> str:
    return f"{DONE_DIR}/{Path(shard).stem}.json"


def plan_hash(payload: Any) -> str:
    """Stable hash of what a shard is made from (its inputs and the settings used)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ShardRecord:
    """What a finished shard holds; written after the shard itself is published."""

    shard: str | None
    """Key of the tar, or None when no sample of this task was accepted."""
    plan: str
    """plan_hash of the task that produced it."""
    sha256: str | None = None
    num_samples: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Manifest rows, one per sample in the shard."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """Inputs that did not make it into the shard, with their reason."""

    def save(self, storage: Storage, key: str) -> None:
        storage.put_text(key, json.dumps(self.__dict__, sort_keys=True, default=str))

    @classmethod
    def load(cls, storage: Storage, key: str) -> "ShardRecord | None":
        try:
            return cls(**json.loads(storage.get_text(key)))
        except ObjectNotFound:
            return None
        except (json.JSONDecodeError, TypeError):
            return None  # a damaged record only means the shard is redone


def write_tar(samples: Iterable[Sample], path: Path) -> int:
    """Write samples to a local tar; returns the number written."""
    n = 0
    with open(path, "wb") as fh:
        writer = wds.TarWriter(fh, encoder=False, mtime=0.0, user="sonosynth", group="sonosynth")
        for sample in samples:
            writer.write(sample.to_wds())
            n += 1
        writer.close()
    return n


def publish_shard(storage: Storage, key: str, samples: list[Sample]) -> tuple[str, int]:
    """Write ``samples`` as one tar and publish it atomically at ``key``; (sha256, bytes)."""
    with tempfile.TemporaryDirectory(prefix="sonosynth-shard-") as tmp:
        path = Path(tmp) / Path(key).name
        write_tar(samples, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        size = path.stat().st_size
        storage.put_file(key, path)
    return digest, size


def find_completed(storage: Storage, done: str, plan: str) -> ShardRecord | None:
    """The completion record at ``done`` if it matches ``plan`` and its shard exists."""
    record = ShardRecord.load(storage, done)
    if record is None or record.plan != plan:
        return None
    if record.shard is not None and not storage.exists(record.shard):
        return None
    return record


def split_completed(storage: Storage, tasks: list[Any], *, done: Callable[[Any], str],
                    plan: Callable[[Any], str]) -> tuple[dict[int, ShardRecord], list[Any]]:
    """The resumable shard-task pattern's first half: ({task position: record} of tasks whose
    completion record matches their plan, [tasks still to run])."""
    finished: dict[int, ShardRecord] = {}
    todo = []
    for i, task in enumerate(tasks):
        record = find_completed(storage, done(task), plan(task))
        if record is not None:
            finished[i] = record
        else:
            todo.append(task)
    return finished, todo


def remove_stale(storage: Storage, name: str, planned: set[str]) -> None:
    """Delete shards ``name-*`` and their records that no task plans (an earlier, larger run)."""
    keep = planned | {done_key(s) for s in planned}
    for prefix in (f"{SHARDS_DIR}/{name}-", f"{DONE_DIR}/{name}-"):
        for key in storage.list(prefix):
            if key not in keep:
                storage.delete(key)
