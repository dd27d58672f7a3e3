"""One small storage interface over local paths and ``s3://bucket/prefix``.

Keys are ``/``-separated paths relative to the storage root. Every put is atomic: a
reader sees the whole object or nothing (local: temp file + rename in the same folder;
S3: one PutObject, or a multipart upload that becomes visible only when completed).
S3 calls retry with backoff on throttling and connection errors; the endpoint comes from
``AWS_ENDPOINT_URL`` (boto3's standard variable) unless the config names one.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sonosynth.infra.config import Config
from sonosynth.infra.retry import RetryPolicy, call_with_retries

PARTIAL_MARK = ".partial-"


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
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(err, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
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
            retries={"total_max_attempts": 1},  # retried here, with our policy
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
        )
        return boto3.client("s3", endpoint_url=self.endpoint, config=boto_cfg)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn):
        from botocore.exceptions import ClientError

        try:
            return call_with_retries(fn, policy=self.policy, is_transient=is_transient_s3_error,
                                     what=f"{what} {self.uri}")
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            where = f"at {self.endpoint}" if self.endpoint else "(AWS default endpoint)"
            if code == "NoSuchBucket":
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist {where}; create it "
                    f"(aws s3 mb s3://{self.bucket}) or set AWS_ENDPOINT_URL to the right server"
                ) from err
            if code in ("NoSuchKey", "404"):
                raise ObjectNotFound(f"{what}: {self.uri} has no such object") from err
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StorageError(
                    f"{what} {self.uri}: access denied {where}; check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY (or the pod's service account)"
                ) from err
            raise StorageError(f"{what} {self.uri} failed {where}: {err}") from err
        except Exception as err:
            from botocore.exceptions import NoCredentialsError

            if isinstance(err, NoCredentialsError):
                raise StorageError(f"{what} {self.uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                                   f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the pod's service account)") from err
            if is_transient_s3_error(err):
                raise StorageError(
                    f"{what} {self.uri}: S3 endpoint {self.endpoint or '(AWS default)'} is "
                    f"unreachable after {self.policy.max_attempts} tries ({err}); check "
                    f"AWS_ENDPOINT_URL and the network"
                ) from err
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data))

    def put_file(self, key: str, path: str | Path) -> None:
        size = Path(path).stat().st_size
        if size < self.config.multipart_threshold_mb * (1 << 20):
            self.put_bytes(key, Path(path).read_bytes())
            return
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=self.config.multipart_threshold_mb << 20)
        self._call(f"upload {key}", lambda: self.client.upload_file(
            str(path), self.bucket, self._key(key), Config=transfer))

    def get_bytes(self, key: str) -> bytes:
        return self._call(f"get {key}", lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def open_read(self, key: str) -> BinaryIO:
        body = self._call(f"open {key}", lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._key(key))["Body"])
        return body  # botocore StreamingBody: read()/close(), streamed from the server

    def exists(self, key: str) -> bool:
        try:
            self._call(f"head {key}", lambda: self.client.head_object(
                Bucket=self.bucket, Key=self._key(key)))
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

        return self._call(f"list {prefix or '/'}", fetch)

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._key(key)))


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
