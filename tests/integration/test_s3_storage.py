"""Storage, ingest and reading against a real S3-compatible server (moto_server, HTTP)."""

from __future__ import annotations

import pytest

from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.reader import DatasetReader
from sonosynth.infra.config import build
from sonosynth.infra.storage import ObjectNotFound, StorageConfig, StorageError, open_storage

pytestmark = pytest.mark.integration


def test_s3_round_trip(s3_bucket, tmp_path):
    st = open_storage(f"s3://{s3_bucket}/some/prefix")
    st.put_bytes("a/x.bin", b"123")
    st.put_text("a/y.txt", "yy")
    assert st.get_bytes("a/x.bin") == b"123"
    assert st.list("a/") == ["a/x.bin", "a/y.txt"]
    assert st.exists("a/y.txt") and not st.exists("a/nope")
    with st.open_read("a/x.bin") as fh:
        assert fh.read() == b"123"
    st.delete("a/x.bin")
    assert st.list() == ["a/y.txt"]
    with pytest.raises(ObjectNotFound):
        st.get_bytes("a/x.bin")


def test_s3_multipart_upload_is_complete_when_visible(s3_bucket, tmp_path):
    big = tmp_path / "big.bin"
    payload = bytes(range(256)) * (6 * 4096 + 7)  # just over 6 MiB
    big.write_bytes(payload)
    st = open_storage(f"s3://{s3_bucket}/mp", StorageConfig(multipart_threshold_mb=5))
    st.put_file("big.bin", big)
    assert st.get_bytes("big.bin") == payload


def test_missing_bucket_and_dead_endpoint_are_clear_errors(s3_bucket):
    with pytest.raises(StorageError, match="does not exist.*mb s3://no-such-bucket"):
        open_storage("s3://no-such-bucket/x").put_bytes("k", b"")
    dead = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=2, backoff_s=0.01,
                         connect_timeout_s=1)
    with pytest.raises(StorageError, match="unreachable after 2 tries"):
        open_storage(f"s3://{s3_bucket}/x", dead).put_bytes("k", b"")


def test_ingest_to_s3_and_stream_back(s3_bucket):
    uri = f"s3://{s3_bucket}/datasets/phantom"
    cfg = build(IngestConfig, {"cohort": {"name": "phantom", "phantom": {"num": 20, "height": 96,
                                                                          "width": 96}},
                               "out": uri, "shards": {"max_samples": 8}})
    report = run_ingest(cfg, progress=False)
    assert report.ingested == 20 and report.shards == 3
    st = open_storage(uri)
    assert {"manifest.parquet", "quarantine.jsonl", "config.yaml"} <= set(st.list())
    keys = [s["key"] for s in DatasetReader(uri)]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 20
    again = run_ingest(cfg, progress=False)
    assert again.reused_shards == 3 and again.ingested == 20
