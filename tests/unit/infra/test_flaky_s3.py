"""The flaky S3 proxy against a real moto_server, seen through a real boto3 client that does not retry."""

from __future__ import annotations

import http.client
import time
import uuid
from urllib.parse import urlsplit

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError, ConnectionClosedError, EndpointConnectionError, IncompleteReadError, ResponseStreamingError,
)

from sonosynth.infra.local.flaky_s3 import Faults, FlakyS3Proxy, flaky_s3 as serve_flaky_s3


def client(url: str):
    return boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1", config=Config(retries={"total_max_attempts": 1}))


@pytest.fixture
def bucket(moto_endpoint):
    name = f"t-{uuid.uuid4().hex[:12]}"
    client(moto_endpoint).create_bucket(Bucket=name)
    return name


def error_code(exc: pytest.ExceptionInfo) -> tuple[int, str]:
    err = exc.value.response
    return err["ResponseMetadata"]["HTTPStatusCode"], err["Error"]["Code"]


def test_without_faults_everything_passes_through_unchanged(flaky_s3, bucket, tmp_path):
    s3 = client(flaky_s3.url)
    s3.put_object(Bucket=bucket, Key="dir/a b+c.bin", Body=b"x" * 1000, ContentType="application/x-thing")
    got = s3.get_object(Bucket=bucket, Key="dir/a b+c.bin")
    assert got["Body"].read() == b"x" * 1000 and got["ContentType"] == "application/x-thing"
    assert s3.get_object(Bucket=bucket, Key="dir/a b+c.bin", Range="bytes=10-19")["Body"].read() == b"x" * 10
    assert s3.head_object(Bucket=bucket, Key="dir/a b+c.bin")["ContentLength"] == 1000
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (4 * 1024 * 25))  # 25 MiB, five 5 MiB parts plus streaming through
    boto3.s3.transfer.S3Transfer(s3, TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20,
                                                    max_concurrency=4)).upload_file(str(big), bucket, "big.bin")
    assert s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == big.read_bytes()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="")["Contents"]
    assert sorted(o["Key"] for o in listed) == ["big.bin", "dir/a b+c.bin"]
    s3.delete_object(Bucket=bucket, Key="dir/a b+c.bin")
    with pytest.raises(ClientError) as exc:
        s3.head_object(Bucket=bucket, Key="dir/a b+c.bin")
    assert error_code(exc)[0] == 404
    assert flaky_s3.counts == dict.fromkeys(flaky_s3.counts, 0) and flaky_s3.events == []


def test_a_chunked_request_body_is_forwarded_decoded(flaky_s3, bucket):
    url = urlsplit(flaky_s3.url)
    conn = http.client.HTTPConnection(url.hostname, url.port)
    conn.request("PUT", f"/{bucket}/chunked", body=iter([b"abc", b"", b"d" * 70_000]), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 200
    conn.close()
    assert client(flaky_s3.url).get_object(Bucket=bucket, Key="chunked")["Body"].read() == b"abc" + b"d" * 70_000


def test_slowdown_is_a_503_that_is_not_forwarded(flaky_s3, bucket, moto_endpoint):
    s3 = client(flaky_s3.url)
    flaky_s3.set_faults(Faults(slowdown=1.0, max_count=1))
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert error_code(exc) == (503, "SlowDown")
    assert "Contents" not in client(moto_endpoint).list_objects_v2(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")  # the bound is reached: clean again
    assert flaky_s3.counts["slowdown"] == 1 and flaky_s3.events == [("slowdown", "PUT", f"/{bucket}/k")]
    flaky_s3.set_faults(Faults(slowdown=1.0, max_count=1))
    with pytest.raises(ClientError) as exc:
        s3.head_object(Bucket=bucket, Key="k")
    assert error_code(exc) == (503, "503")  # an answer to HEAD has no body, so no error code in it


def test_lost_ack_writes_and_then_answers_500(flaky_s3, bucket, moto_endpoint):
    s3 = client(flaky_s3.url)
    flaky_s3.set_faults(Faults(lost_ack=1.0, max_count=2))
    s3.list_objects_v2(Bucket=bucket)  # reads never lose their answer
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="k", Body=b"written")
    assert error_code(exc) == (500, "InternalError")
    assert client(moto_endpoint).get_object(Bucket=bucket, Key="k")["Body"].read() == b"written"
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"written"
    with pytest.raises(ClientError):
        s3.delete_object(Bucket=bucket, Key="k")
    assert "Contents" not in client(moto_endpoint).list_objects_v2(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"again")  # the bound is reached
    assert flaky_s3.counts["lost_ack"] == 2


def test_cut_body_fails_the_read(flaky_s3, bucket):
    s3 = client(flaky_s3.url)
    s3.put_object(Bucket=bucket, Key="k", Body=b"y" * 300_000)
    flaky_s3.set_faults(Faults(cut_body=1.0, max_count=1))
    s3.head_object(Bucket=bucket, Key="k")  # no body: not cut, and the bound is not spent
    body = s3.get_object(Bucket=bucket, Key="k")["Body"]
    with pytest.raises((ResponseStreamingError, IncompleteReadError)):
        body.read()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"y" * 300_000
    assert flaky_s3.counts["cut_body"] == 1
    flaky_s3.set_faults(Faults(cut_body=1.0, max_count=1))
    with pytest.raises(ClientError) as exc:  # botocore reads a cut 200 XML answer as a 500 (_handle_200_error)
        s3.list_objects_v2(Bucket=bucket)
    assert error_code(exc) == (500, "500")


def test_reset_is_a_connection_error_and_is_not_forwarded(flaky_s3, bucket, moto_endpoint):
    s3 = client(flaky_s3.url)
    s3.list_objects_v2(Bucket=bucket)  # a pooled keep-alive connection, as a real client has
    flaky_s3.set_faults(Faults(reset=1.0, max_count=1))
    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert "Contents" not in client(moto_endpoint).list_objects_v2(Bucket=bucket)
    flaky_s3.set_faults(Faults(reset=1.0, max_count=1))
    with pytest.raises(ConnectionClosedError):
        s3.get_object(Bucket=bucket, Key="k")
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert flaky_s3.counts["reset"] == 2


def test_slow_adds_latency(flaky_s3, bucket):
    s3 = client(flaky_s3.url)
    flaky_s3.set_faults(Faults(slow=1.0, slow_s=0.3, max_count=1))
    start = time.monotonic()
    s3.list_objects_v2(Bucket=bucket)
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    s3.list_objects_v2(Bucket=bucket)
    assert time.monotonic() - start < 0.3 and flaky_s3.counts["slow"] == 1


def run_sequence(proxy: FlakyS3Proxy, bucket: str, faults: Faults) -> list[tuple[str, str, str]]:
    s3 = client(proxy.url)
    proxy.set_faults(faults)
    proxy.reset_counts()
    for i in range(20):
        try:
            s3.put_object(Bucket=bucket, Key=f"seq/{i}", Body=b"v")
        except ClientError:
            pass
    return proxy.events


def test_a_seed_reproduces_the_same_faults_and_bounds_hold(flaky_s3, bucket):
    faults = Faults(slowdown=0.3, lost_ack=0.5, max_count={"slowdown": 3, "lost_ack": 2}, seed=7)
    first = run_sequence(flaky_s3, bucket, faults)
    assert run_sequence(flaky_s3, bucket, faults) == first
    assert flaky_s3.counts["slowdown"] == 3 and flaky_s3.counts["lost_ack"] == 2
    assert run_sequence(flaky_s3, bucket, Faults(slowdown=0.3, lost_ack=0.3, max_count=None, seed=8)) != first


def test_match_limits_faults_to_matching_keys(flaky_s3, bucket):
    s3 = client(flaky_s3.url)
    flaky_s3.set_faults(Faults(slowdown=1.0, max_count=None, match=r"\.tar$"))
    s3.put_object(Bucket=bucket, Key="a.json", Body=b"v")
    for _ in range(3):
        with pytest.raises(ClientError):
            s3.put_object(Bucket=bucket, Key="shard-0.tar", Body=b"v")
    assert flaky_s3.counts["slowdown"] == 3


def test_break_forever_until_heal(flaky_s3, bucket):
    s3 = client(flaky_s3.url)
    s3.put_object(Bucket=bucket, Key="broken/x", Body=b"v")
    flaky_s3.set_faults(Faults(slowdown=1.0, max_count=0))
    flaky_s3.break_forever(r"^/[^/]+/broken/", kind="slowdown")
    for _ in range(10):
        with pytest.raises(ClientError) as exc:
            s3.get_object(Bucket=bucket, Key="broken/x")
        assert error_code(exc) == (503, "SlowDown")
    s3.put_object(Bucket=bucket, Key="fine/x", Body=b"v")
    assert flaky_s3.counts["slowdown"] == 10
    flaky_s3.heal()
    flaky_s3.break_forever("broken", kind="cut_body")
    for _ in range(5):
        with pytest.raises(ResponseStreamingError):
            s3.get_object(Bucket=bucket, Key="broken/x")["Body"].read()
    assert flaky_s3.counts["cut_body"] == 5
    flaky_s3.heal()
    assert s3.get_object(Bucket=bucket, Key="broken/x")["Body"].read() == b"v"
    with pytest.raises(ValueError):
        flaky_s3.break_forever("x", kind="nope")


def test_the_context_manager_starts_and_stops_its_own_proxy(moto_endpoint, bucket):
    with serve_flaky_s3(moto_endpoint, Faults(slowdown=1.0, max_count=1)) as proxy:
        s3 = client(proxy.url)
        with pytest.raises(ClientError):
            s3.list_objects_v2(Bucket=bucket)
        s3.list_objects_v2(Bucket=bucket)
    with pytest.raises(EndpointConnectionError):
        client(proxy.url).list_objects_v2(Bucket=bucket)
