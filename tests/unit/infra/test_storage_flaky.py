"""S3Storage and the S3 lease against a real moto_server behind a fault-injecting proxy: every
fault fires (the proxy's counters say so) and the calls still succeed, with nothing duplicated
and nothing partial; a fault that never clears ends in an error naming the object, the
endpoint and the tries."""

from __future__ import annotations

import io
import logging
import tarfile

import boto3
import pytest

from sonosynth.infra.lease import Lease
from sonosynth.infra.local.flaky_s3 import Faults
from sonosynth.infra.storage import S3Storage, StorageConfig, StorageError

FAST = StorageConfig(max_attempts=8, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture
def bucket_via_proxy(s3_bucket, flaky_s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky_s3.url)
    return s3_bucket


def direct_keys(moto_endpoint: str, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert not uploads, f"incomplete multipart uploads left: {uploads}"
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_every_fault_fires_and_every_call_still_succeeds(bucket_via_proxy, flaky_s3, moto_endpoint, caplog):
    st = S3Storage(f"s3://{bucket_via_proxy}/run", FAST)
    flaky_s3.set_faults(Faults(slowdown=0.2, lost_ack=0.2, cut_body=0.3, reset=0.1, slow=0.1, slow_s=0.05,
                               max_count=4, seed=3))
    blobs = {f"part/{i:02d}.bin": bytes([i]) * (20_000 + i) for i in range(12)}
    with caplog.at_level(logging.WARNING, logger="sonosynth.infra.retry"):
        for key, data in blobs.items():
            st.put_bytes(key, data)
        for _ in range(2):
            assert {k: st.get_bytes(k) for k in blobs} == blobs
            assert st.list("part/") == sorted(blobs)
        st.delete("part/00.bin")
        assert not st.exists("part/00.bin")
    fired = flaky_s3.counts
    assert all(fired[k] > 0 for k in ("slowdown", "lost_ack", "cut_body", "reset")), fired
    assert direct_keys(moto_endpoint, bucket_via_proxy) == [f"run/{k}" for k in sorted(blobs)[1:]]
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) >= sum(fired[k] for k in ("slowdown", "lost_ack", "reset")) - 1
    assert all(f"s3://{bucket_via_proxy}/run" in m and "retry " in m for m in retries)


def test_a_stream_cut_mid_way_resumes_at_its_offset_with_the_same_bytes(bucket_via_proxy, flaky_s3):
    st = S3Storage(f"s3://{bucket_via_proxy}/shards", FAST)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(6):
            data = bytes(range(256)) * (400 + i)
            info = tarfile.TarInfo(f"s{i}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    st.put_bytes("a.tar", buf.getvalue())
    flaky_s3.set_faults(Faults(cut_body=1.0, max_count=3, match="a.tar"))
    with st.open_read("a.tar") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        names = [m.name for m in tar if tar.extractfile(m).read()]
    assert names == [f"s{i}.bin" for i in range(6)] and flaky_s3.counts["cut_body"] == 3


def test_a_fault_that_never_clears_names_the_object_the_endpoint_and_the_tries(bucket_via_proxy, flaky_s3):
    st = S3Storage(f"s3://{bucket_via_proxy}/run", StorageConfig(max_attempts=3, backoff_s=0.01))
    flaky_s3.break_forever(r"/run/stuck\.json", kind="slowdown")
    with pytest.raises(StorageError) as err:
        st.put_text("stuck.json", "{}")
    assert f"put s3://{bucket_via_proxy}/run/stuck.json failed after 3 tries at S3 endpoint {flaky_s3.url}" \
        in str(err.value)
    flaky_s3.heal()
    st.put_text("stuck.json", "{}")  # the fault gone, the same call works
    assert st.get_text("stuck.json") == "{}"


def test_a_lease_whose_acknowledgements_are_lost_is_still_taken_renewed_and_released(bucket_via_proxy, flaky_s3):
    root = f"s3://{bucket_via_proxy}/nightly"
    flaky_s3.set_faults(Faults(lost_ack=1.0, max_count=3, match="lease"))
    lease = Lease(root, "_pipeline/lease.json", ttl_s=60, storage_config=FAST)
    with lease.held():
        lease.renew()
        assert lease.lost is None
    assert flaky_s3.counts["lost_ack"] == 3
    assert not S3Storage(root, FAST).exists("_pipeline/lease.json")
