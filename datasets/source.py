"""A cohort's source as a listing: what is there, and a fingerprint that changes when it does.

The pipeline keys an ingest section by its config *and* its source's fingerprint, so a
source folder or ``s3://`` prefix that gained, changed or lost labelled images re-runs
ingest and everything that reads it, and an unchanged one skips it. The fingerprint hashes
the sorted listing of (relative name, size, version): on S3 the version is the ETag; on
local disk it is the modification time, or with ``fingerprint: content`` a SHA-256 of the
bytes (stable across copies, at the cost of reading every file).

An ``s3://`` source is read through a local mirror (``mirror``): new and changed objects are
downloaded, removed ones deleted, so the cohort adapters read plain folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sonosynth.infra.stage import InputNotFound
from sonosynth.infra.storage import ObjectInfo, StorageConfig, open_storage

log = logging.getLogger(__name__)
FingerprintMode = Literal["stat", "content"]
MIRROR_RECORD = ".sonosynth-mirror.json"


@dataclass(frozen=True)
class SourceFingerprint:
    uri: str
    mode: str
    files: int
    bytes: int
    digest: str

    def short(self) -> str:
        return f"{self.digest} ({self.files} files, {self.bytes} bytes, {self.mode})"


def _hidden(key: str) -> bool:
    return any(part.startswith(".") for part in key.split("/"))


def _content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _single_object(uri: str, storage: StorageConfig | None) -> tuple[object, str] | None:
    """(storage of the parent, name) when an ``s3://`` URI names one object, e.g. an index CSV."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if "." not in name or parent.endswith(":/"):
        return None
    store = open_storage(parent, storage)
    return (store, name) if store.exists(name) else None


def listing(uri: str, mode: FingerprintMode = "stat", storage: StorageConfig | None = None) -> list[ObjectInfo]:
    """Every visible file under ``uri`` (a folder, a single file or an ``s3://`` prefix)."""
    if "://" not in uri:
        path = Path(uri).expanduser()
        if path.is_file():
            st = path.stat()
            version = _content_hash(path) if mode == "content" else str(st.st_mtime_ns)
            return [ObjectInfo(path.name, st.st_size, version)]
        if not path.is_dir():
            raise InputNotFound(f"source {uri} does not exist; check cohort.src (a folder or s3:// prefix)")
        infos = [i for i in open_storage(path).list_info("") if not _hidden(i.key)]
        if mode == "content":
            infos = [ObjectInfo(i.key, i.size, _content_hash(path / i.key)) for i in infos]
        return infos
    single = _single_object(uri, storage)
    if single is not None:
        store, name = single
        return [i for i in store.list_info(name) if i.key == name]
    infos = [i for i in open_storage(uri.rstrip("/"), storage).list_info("") if not _hidden(i.key)]
    if not infos:
        raise InputNotFound(f"source {uri} holds no objects; check cohort.src and AWS_ENDPOINT_URL")
    return infos


def fingerprint(uris: list[str], mode: FingerprintMode = "stat",
                storage: StorageConfig | None = None) -> SourceFingerprint:
    """One fingerprint of several sources (e.g. the image folder and its index CSV)."""
    h = hashlib.sha256()
    files = size = 0
    for uri in uris:
        h.update(f"\0{uri}\0".encode())
        for info in listing(uri, mode, storage):
            h.update(f"{info.key}\t{info.size}\t{info.version}\n".encode())
            files += 1
            size += info.size
    return SourceFingerprint(" + ".join(uris), mode, files, size, h.hexdigest()[:16])


def default_mirror_root() -> Path:
    return Path.home() / ".cache" / "sonosynth" / "sources"


def mirror(uri: str, cache_dir: str | Path | None = None, storage: StorageConfig | None = None) -> Path:
    """A local folder (or file) with the contents of an ``s3://`` prefix (or object), brought up
    to date; a local path is returned as it is."""
    if not uri.startswith("s3://"):
        return Path(uri).expanduser()
    root = Path(cache_dir or default_mirror_root()).expanduser()
    folder = root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    single = _single_object(uri, storage)
    if single is not None:
        store, name = single
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.get_bytes(name))
        return dest
    store = open_storage(uri.rstrip("/"), storage)
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / MIRROR_RECORD
    have: dict[str, str] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    wanted = {i.key: i.version for i in store.list_info("") if not _hidden(i.key)}
    fetched = 0
    for key, version in wanted.items():
        dest = folder / key
        if have.get(key) == version and dest.is_file():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        tmp.write_bytes(store.get_bytes(key))
        os.replace(tmp, dest)
        have[key] = version
        fetched += 1
    removed = [k for k in have if k not in wanted]
    for key in removed:
        (folder / key).unlink(missing_ok=True)
        del have[key]
    record_path.write_text(json.dumps(have, sort_keys=True))
    log.info("mirrored %s into %s: %d fetched, %d removed, %d unchanged", uri, folder, fetched, len(removed),
             len(wanted) - fetched)
    return folder


__all__ = ["FingerprintMode", "SourceFingerprint", "default_mirror_root", "fingerprint", "listing", "mirror"]
