"""``manifest.parquet``: one row per sample of a dataset, with a fixed schema."""

from __future__ import annotations

import io
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from sonosynth.datasets.tario import CorruptShardError
from sonosynth.infra.storage import ObjectNotFound, Storage, StorageError

MANIFEST = "manifest.parquet"

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("cohort", pa.string()),
    ("source", pa.string()),
    ("source_id", pa.string()),
    ("patient_id", pa.string()),
    ("plane", pa.string()),
    ("split", pa.string()),
    ("has_mask", pa.bool_()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("pixel_size_mm", pa.float64()),
    ("qc_fit_rmse_px", pa.float64()),
    ("qc_outline_coverage", pa.float64()),
    ("qc_area_frac", pa.float64()),
    ("qc_touches_border", pa.bool_()),
    ("qc_was_outline", pa.bool_()),
    ("qc_ellipse_cx", pa.float64()),
    ("qc_ellipse_cy", pa.float64()),
    ("qc_ellipse_a", pa.float64()),
    ("qc_ellipse_b", pa.float64()),
    ("qc_ellipse_theta", pa.float64()),
    ("qc_label_fidelity", pa.float64()),
])
COLUMNS = tuple(SCHEMA.names)


def manifest_row(sample, shard: str) -> dict[str, Any]:
    """The manifest row of a sample published in ``shard`` (columns not in the schema are dropped)."""
    return {"key": sample.key, "shard": shard, **sample.meta}


def to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


def write_manifest(storage: Storage, rows: Iterable[dict[str, Any]]) -> pa.Table:
    table = to_table(sorted(rows, key=lambda r: r["key"]))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.put_bytes(MANIFEST, buf.getvalue())
    return table


def read_manifest(storage: Storage) -> pa.Table:
    try:
        data = storage.get_bytes(MANIFEST)
    except ObjectNotFound:
        raise StorageError(
            f"{storage.url(MANIFEST)} is missing: is {storage.uri} a sonosynth dataset? "
            f"(`sonosynth ingest ... --out {storage.uri}` writes one)"
        ) from None
    return pq.read_table(pa.BufferReader(arrow_buffer(data)))


def arrow_buffer(data: bytes) -> pa.Buffer:
    """``data`` copied into memory Arrow owns, for reading parquet from memory. Arrow's worker
    threads may drop the last reference to a reader's source after ``read_table`` returns; when
    that source is a Python object (``io.BytesIO``, or bytes wrapped by ``pa.BufferReader``) its
    release takes the GIL, and during interpreter exit that ends the thread inside a C++
    destructor: the process aborts ("terminate called without an active exception", exit 134)."""
    out = pa.BufferOutputStream()
    out.write(data)
    return out.getvalue()


def missing_shard(storage: Storage, shard: str) -> CorruptShardError:
    """The error for a shard the manifest lists that storage does not hold (reason ``missing_shard``)."""
    return CorruptShardError(
        f"{storage.url(MANIFEST)} lists samples in {storage.url(shard)}, which does not exist: the dataset is "
        f"incomplete (a shard deleted, or not copied with the manifest); re-run the stage that wrote "
        f"{storage.uri} (`sonosynth ingest` or `sonosynth generate` with the same --out: it rewrites missing "
        "shards), or read past it with the reader's on_error: skip",
        shard=storage.url(shard), reason="missing_shard")
