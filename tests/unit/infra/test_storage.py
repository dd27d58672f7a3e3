from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from sonosynth.infra.retry import RetryPolicy, call_with_retries
from sonosynth.infra.storage import (
    LocalStorage, ObjectNotFound, S3Storage, StorageConfig, StorageError, is_transient_s3_error,
    open_storage,
)


def test_local_put_get_list_exists_delete(tmp_path):
    st = open_storage(tmp_path / "root")
    st.put_bytes("a/b.bin", b"x" * 10)
    st.put_text("a/c.txt", "hello")
    assert st.get_bytes("a/b.bin") == b"x" * 10 and st.get_text("a/c.txt") == "hello"
    assert st.list("a/") == ["a/b.bin", "a/c.txt"] and st.list("a/c") == ["a/c.txt"]
    assert st.exists("a/b.bin") and not st.exists("a/zz")
    st.delete("a/b.bin")
    assert st.list() == ["a/c.txt"]
    with pytest.raises(ObjectNotFound):
        st.get_bytes("a/b.bin")


def test_local_put_is_atomic_and_a_failed_write_keeps_the_old_object(tmp_path):
    st = LocalStorage(tmp_path)
    st.put_bytes("obj", b"old")

    def exploding(fh):
        fh.write(b"half of the new")
        raise RuntimeError("disk died")

    with pytest.raises(RuntimeError):
        st._atomic_write("obj", exploding)
    assert st.get_bytes("obj") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["obj"]


def test_local_partial_files_are_not_listed(tmp_path):
    st = LocalStorage(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".x.tar.partial-123").write_bytes(b"...")
    st.put_bytes("shards/y.tar", b"done")
    assert st.list("shards/") == ["shards/y.tar"]


def test_local_keys_cannot_escape_the_root(tmp_path):
    with pytest.raises(StorageError, match="outside"):
        LocalStorage(tmp_path / "r").put_bytes("../evil", b"")


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(StorageError, match="s3://bucket/prefix"):
        open_storage("gs://bucket/x")


def _throttle():
    return ClientError({"Error": {"Code": "SlowDown", "Message": "slow"},
                        "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")


class FlakyClient:
    """In-process stand-in for the error path only: fails N times, then works."""

    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = 0

    def put_object(self, **kw):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return {}


def test_s3_retries_throttling_and_connection_errors_then_succeeds():
    client = FlakyClient([_throttle(), EndpointConnectionError(endpoint_url="http://x")])
    st = S3Storage("s3://b/p", StorageConfig(backoff_s=0.001), client=client)
    st.put_bytes("k", b"v")
    assert client.calls == 3


def test_s3_gives_up_after_max_attempts_with_the_endpoint_in_the_message():
    client = FlakyClient([EndpointConnectionError(endpoint_url="http://x")] * 5)
    st = S3Storage("s3://b/p", StorageConfig(max_attempts=3, backoff_s=0.001,
                                             endpoint_url="http://127.0.0.1:1"), client=client)
    with pytest.raises(StorageError, match=r"put s3://b/p/k: S3 endpoint http://127.0.0.1:1 is unreachable after 3"):
        st.put_bytes("k", b"v")
    assert client.calls == 3


def test_s3_does_not_retry_permanent_errors():
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put")
    client = FlakyClient([denied])
    st = S3Storage("s3://b", StorageConfig(backoff_s=0.001), client=client)
    with pytest.raises(StorageError, match="access denied"):
        st.put_bytes("k", b"v")
    assert client.calls == 1
    assert not is_transient_s3_error(denied) and is_transient_s3_error(_throttle())


def test_backoff_grows_and_is_bounded():
    import random

    policy = RetryPolicy(max_attempts=10, base_delay_s=1.0, max_delay_s=4.0)
    rng = random.Random(0)
    assert all(policy.delay(a, rng) <= min(4.0, 2 ** (a - 1)) for a in range(1, 10))
    slept = []
    with pytest.raises(ValueError):
        call_with_retries(lambda: (_ for _ in ()).throw(ValueError("x")), policy=policy,
                          is_transient=lambda e: True, what="t", sleep=slept.append)
    assert len(slept) == 9
