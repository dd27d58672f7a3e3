"""One small storage interface over local paths and ``s3://bucket/prefix``.

Keys are ``/``-separated paths relative to the storage root. Every put is atomic: a
reader sees the whole object or nothing (local: temp file + rename in the same folder;
S3: one PutObject, or a multipart upload that becomes visible only when completed).
S3 calls retry with backoff on throttling, server errors, connection errors and bodies cut
mid-way. This layer alone retries them (boto3 makes one try per call, so retries do not
multiply), and logs each retry with the object's URL and the attempt. A streamed read that
breaks resumes where it stopped, with a ranged GET of the same version. The endpoint comes
from ``AWS_ENDPOINT_URL`` (boto3's standard variable) unless the config names one.
"""

from __future__ import annotations

import io
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sonosynth.infra.config import Config
from sonosynth.infra.retry import RetryPolicy, call_with_retries

PARTIAL_MARK = ".partial-"


BOTO_RETRY_DEFAULTS = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "5"}
"""botocore's own retries for the boto3 clients sonosynth does not make (MLflow's artifact
store, s3fs, a tracking server's S3): set by the CLI where unset. Storage's client makes one
try per call and retries itself, so the two never multiply."""


def default_boto_retries(environ=os.environ) -> None:
    """Give other libraries' boto3 clients botocore's standard retry mode unless set."""
    for name, value in BOTO_RETRY_DEFAULTS.items():
        environ.setdefault(name, value)


class StorageError(RuntimeError):
    """Storage could not be reached or used; the message names the URI and the fix."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The key does not exist under the storage root."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing: its key, size and version (S3: the ETag; local: the mtime in ns)."""

    key: str
    size: int
    version: str


class StorageConfig(Config):
    """How sonosynth talks to its storage (local folders need none of this)."""

    max_attempts: int = 5
    """Tries per S3 call, the first included, on throttling and connection errors."""
    backoff_s: float = 0.5
    """First retry delay bound in seconds; doubles per retry (full jitter)."""
    max_backoff_s: float = 20.0
    """Upper bound of one retry delay in seconds."""
    endpoint_url: str | None = None
    """S3 endpoint, e.g. http://127.0.0.1:5000 for a local server; default AWS_ENDPOINT_URL."""
    connect_timeout_s: float = 10.0
    """Seconds to wait for an S3 connection before counting a failed try."""
    read_timeout_s: float = 60.0
    """Seconds to wait for S3 response bytes before counting a failed try."""
    multipart_threshold_mb: int = 64
    """Objects at least this big go up as a multipart upload (completed atomically)."""

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.backoff_s, self.max_backoff_s)


class Storage(ABC):
    """A root (folder or S3 prefix) holding objects addressed by relative keys."""

    uri: str

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted; partial writes excluded."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """As ``list``, with each object's size and version."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} points outside {self.root}")
        return path

    def _atomic_write(self, key: str, write) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}{PARTIAL_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda fh: fh.write(data))

    def put_file(self, key: str, path: str | Path) -> None:
        def copy(fh):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)

        self._atomic_write(key, copy)

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as fh:
            return fh.read()

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{path} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _, files in os.walk(start):
            for name in files:
                if PARTIAL_MARK in name:
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        out = []
        for key in self.list(prefix):
            st = self._path(key).stat()
            out.append(ObjectInfo(key, st.st_size, str(st.st_mtime_ns)))
        return out

    def delete(self, key: str) -> None:
        """Remove the object, and folders it leaves empty (S3 has no folders to leave behind)."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break


_TRANSIENT_S3_CODES = {
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown",
    "RequestLimitExceeded", "TooManyRequestsException", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "503", "500",
}


def is_transient_s3_error(err: BaseException) -> bool:
    """Throttling, server errors, lost connections and cut bodies: worth another try."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError
    from urllib3.exceptions import ProtocolError

    if isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError, ProtocolError,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _TRANSIENT_S3_CODES or status in (429, 500, 502, 503, 504)
    return False


class S3Storage(Storage):
    def __init__(self, uri: str, config: StorageConfig | None = None, client=None):
        self.config = config or StorageConfig()
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint = self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.client = client or self._make_client()
        self.policy = self.config.retry_policy()

    def _make_client(self):
        import boto3
        from botocore.config import Config as BotoConfig

        boto_cfg = BotoConfig(
            retries={"mode": "standard", "total_max_attempts": 1},  # retried here, with our policy
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
        )
        return boto3.client("s3", endpoint_url=self.endpoint, config=boto_cfg)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, verb: str, key: str, fn):
        """``fn()`` with retries; errors become StorageError naming the object, endpoint and tries."""
        from botocore.exceptions import ClientError, NoCredentialsError

        url = self.url(key) if key else self.uri
        where = f"at {self.endpoint}" if self.endpoint else "(AWS default endpoint)"
        try:
            return call_with_retries(fn, policy=self.policy, is_transient=is_transient_s3_error, what=f"{verb} {url}")
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist {where}; create it "
                    f"(aws s3 mb s3://{self.bucket}) or set AWS_ENDPOINT_URL to the right server"
                ) from err
            if code in ("NoSuchKey", "404"):
                raise ObjectNotFound(f"{verb}: {url} does not exist") from err
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StorageError(
                    f"{verb} {url}: access denied {where}; check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY (or the pod's service account)"
                ) from err
            if is_transient_s3_error(err):
                raise StorageError(self._gave_up(verb, url, err)) from err
            raise StorageError(f"{verb} {url} failed {where}: {err}") from err
        except NoCredentialsError as err:
            raise StorageError(f"{verb} {url}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the pod's service account)") from err
        except Exception as err:
            if is_transient_s3_error(err):
                raise StorageError(self._gave_up(verb, url, err)) from err
            raise

    def _gave_up(self, verb: str, url: str, err: BaseException) -> str:
        from botocore.exceptions import EndpointConnectionError

        if isinstance(err, EndpointConnectionError):
            return (f"{verb} {url}: S3 endpoint {self.endpoint or '(AWS default)'} is unreachable after "
                    f"{self.policy.max_attempts} tries ({err}); check AWS_ENDPOINT_URL and the network")
        return (f"{verb} {url} failed after {self.policy.max_attempts} tries at S3 endpoint "
                f"{self.endpoint or '(AWS default)'} (last: {type(err).__name__}: {str(err)[:200]}); check the "
                f"endpoint's health and AWS_ENDPOINT_URL, or raise storage.max_attempts; re-running resumes")

    def put_bytes(self, key: str, data: bytes) -> None:
        # a put retried after a lost acknowledgement writes the same bytes again: harmless
        self._call("put", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def put_file(self, key: str, path: str | Path) -> None:
        size = Path(path).stat().st_size
        if size < self.config.multipart_threshold_mb * (1 << 20):
            self.put_bytes(key, Path(path).read_bytes())
            return
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=self.config.multipart_threshold_mb << 20)
        self._call("upload", key, lambda: self.client.upload_file(
            str(path), self.bucket, self._key(key), Config=transfer))

    def get_bytes(self, key: str) -> bytes:
        return self._call("get", key, lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def open_read(self, key: str) -> BinaryIO:
        """A stream of the object; a read that breaks resumes at its offset (ranged GET, same ETag)."""
        return _ResumableBody(self, key)

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        return [info.key for info in self.list_info(prefix)]

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        def fetch():
            out = []
            paginator = self.client.get_paginator("list_objects_v2")
            under = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=under):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                    out.append(ObjectInfo(key, int(obj["Size"]), str(obj["ETag"]).strip('"')))
            return sorted(out, key=lambda o: o.key)

        return self._call("list", prefix, fetch)

    def delete(self, key: str) -> None:
        # a delete retried after a lost acknowledgement finds nothing: S3 answers 204 again
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))


class _ResumableBody(io.RawIOBase):
    """A read-only stream over one version of an S3 object. A read that breaks (a body cut
    mid-way, a reset) is retried with the storage's policy: the object is re-opened at the
    current offset with ``Range`` and ``IfMatch`` (the ETag first seen), so the bytes go on
    where they stopped and cannot come from a newer version."""

    def __init__(self, storage: S3Storage, key: str):
        super().__init__()
        self.storage, self.key, self.pos = storage, key, 0
        self.etag: str | None = None
        self.body = None
        storage._call("open", key, self._open)  # a missing object fails here, as a local open() would

    def _open(self) -> None:
        s = self.storage
        resume = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag} if self.etag else {}
        got = s.client.get_object(Bucket=s.bucket, Key=s._key(self.key), **resume)
        self.etag, self.body = got["ETag"], got["Body"]

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        if self.body is None:
            self._open()
        try:
            data = self.body.read(n) if n is not None and n >= 0 else self.body.read()
        except Exception:
            self.body = None  # the next try re-opens at self.pos
            raise
        self.pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        return self.storage._call(f"read (from byte {self.pos})", self.key, lambda: self._read(n))

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def open_storage(uri: str | Path, config: StorageConfig | None = None) -> Storage:
    """A Storage for a local path or an ``s3://bucket/prefix`` URI."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3Storage(text, config)
    if "://" in text and not text.startswith("file://"):
        raise StorageError(f"unsupported storage URI {text!r}: use a local path or s3://bucket/prefix")
    return LocalStorage(text.removeprefix("file://"))


__all__ = [
    "LocalStorage", "ObjectInfo", "ObjectNotFound", "S3Storage", "Storage", "StorageConfig",
    "StorageError", "open_storage", "is_transient_s3_error",
]
