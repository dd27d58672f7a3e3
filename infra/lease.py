"""One writer at a time for an output folder: a lease with an owner, a host and an expiry.

``Lease(root, key)`` is a small JSON object at ``root/key`` (a local folder or an ``s3://``
prefix). Taking it succeeds when no one holds it, when its holder's expiry has passed (the
holder died or hung), or when the holder is a process of this host that no longer runs (a
killed run on a laptop frees its output at once); otherwise ``LeaseHeld`` names the holder,
its host and when it expires. While held it is renewed in the background every ``ttl_s / 3``
seconds, so a live holder never loses it and a dead one on another host (a lost pod) loses it
``ttl_s`` seconds after its last renewal. Every change is a compare-and-swap, so two takers never both win:

- on S3, conditional writes: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to renew,
  take over or delete (S3 since 2024; MinIO, Ceph RGW and moto support them too);
- on local disk, an ``flock`` on ``<key>.lock`` around each read-modify-write (released by
  the kernel if the process dies inside one) and an atomic rename to publish.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sonosynth.infra.stage import StageFailed

log = logging.getLogger(__name__)
_SERIAL = itertools.count()


class LeaseHeld(StageFailed):
    """Someone else holds the lease; the message names the holder and when it expires."""


class LeaseLost(StageFailed):
    """The lease was taken over while we thought we held it (we stalled past its expiry)."""


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    purpose: str
    acquired: float
    expires: float

    @staticmethod
    def parse(text: str) -> "Holder":
        d = json.loads(text)
        return Holder(str(d["owner"]), str(d["host"]), int(d["pid"]), str(d.get("purpose", "")),
                      float(d["acquired"]), float(d["expires"]))

    def dump(self) -> str:
        return json.dumps({**self.__dict__, "expires_utc": _utc(self.expires),
                           "acquired_utc": _utc(self.acquired)}, indent=1)

    def is_dead(self) -> bool:
        """Whether the holder is known to be gone: a process of this host that no longer runs
        (killed, crashed). A holder on another host is only known dead when its lease expires."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def describe(self) -> str:
        return (f"{self.purpose or 'a sonosynth run'} (owner {self.owner}, host {self.host}, pid {self.pid}, "
                f"since {_utc(self.acquired)}, expires {_utc(self.expires)} unless renewed)")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class _LocalCell:
    """A file whose read-modify-write is serialised by flock."""

    def __init__(self, root: str, key: str):
        self.path = Path(root).expanduser().resolve() / key
        self.uri = str(self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> tuple[str | None, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        return text, text  # the content is its own version

    def swap(self, expected: Any, text: str | None) -> Any:
        """Write ``text`` (None: delete) if the current version is ``expected`` (None: absent);
        returns the new version (True for a delete), or None when the version differed."""
        with self._locked():
            current, _ = self.read()
            if current != expected:
                return None
            if text is None:
                self.path.unlink(missing_ok=True)
                return True
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, self.path)
            return text


class _S3Cell:
    """An S3 object changed only by conditional requests (the ETag is the version)."""

    def __init__(self, root: str, key: str, storage_config=None):
        from sonosynth.infra.storage import S3Storage

        self.storage = S3Storage(root, storage_config)
        self.key = self.storage._key(key)
        self.uri = self.storage.url(key)

    def _request(self, what: str, fn):
        from botocore.exceptions import ClientError

        from sonosynth.infra.retry import call_with_retries
        from sonosynth.infra.storage import is_transient_s3_error

        try:
            return call_with_retries(fn, policy=self.storage.policy, is_transient=is_transient_s3_error,
                                     what=f"{what} {self.uri}")
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return None
            if code in ("NoSuchKey", "404") or status == 404:
                return "missing"
            raise

    def read(self) -> tuple[str | None, Any]:
        got = self._request("read lease", lambda: self.storage.client.get_object(Bucket=self.storage.bucket,
                                                                                  Key=self.key))
        if got in (None, "missing"):
            return None, None
        return got["Body"].read().decode(), got["ETag"]

    def swap(self, expected: Any, text: str | None) -> Any:
        """As ``_LocalCell.swap``; the version is the object's ETag."""
        c, b, k = self.storage.client, self.storage.bucket, self.key
        if text is None:
            done = self._request("release lease", lambda: c.delete_object(Bucket=b, Key=k, IfMatch=expected))
            if done is None and self.read()[0] is None:  # deleted, and the answer was lost
                return True
            return None if done in (None, "missing") else True
        if expected is None:
            done = self._request("take lease", lambda: c.put_object(Bucket=b, Key=k, Body=text.encode(),
                                                                    IfNoneMatch="*"))
        else:
            done = self._request("renew lease", lambda: c.put_object(Bucket=b, Key=k, Body=text.encode(),
                                                                     IfMatch=expected))
        if done in (None, "missing"):
            # A write whose answer was lost and was retried fails its own precondition: the
            # lease then holds exactly our text (it names us and the instant), so it is ours.
            current, etag = self.read()
            return etag if current == text else None
        return done["ETag"]


class Lease:
    """``with Lease(root, key, ttl_s=...).held(): ...`` runs the body as the only holder."""

    def __init__(self, root: str, key: str, *, ttl_s: float = 900.0, purpose: str = "",
                 storage_config=None, clock=time.time):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        self.cell = _S3Cell(root, key, storage_config) if root.startswith("s3://") else _LocalCell(root, key)
        self.ttl_s, self.purpose, self.clock = ttl_s, purpose, clock
        self.me = f"{socket.gethostname()}-{os.getpid()}-{int(clock() * 1000)}-{next(_SERIAL)}"
        self.version: Any = None
        self._acquired = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.cell.uri

    def _record(self, acquired: float | None = None) -> str:
        now = self.clock()
        return Holder(self.me, socket.gethostname(), os.getpid(), self.purpose, acquired or now,
                      now + self.ttl_s).dump()

    def acquire(self) -> Holder | None:
        """Take the lease; returns the expired holder it replaced (None if it was free)."""
        for _ in range(5):  # a lost race re-reads and decides again
            text, version = self.cell.read()
            previous = None
            if text is not None:
                try:
                    previous = Holder.parse(text)
                except (ValueError, KeyError, TypeError):
                    log.warning("the lease %s is unreadable; taking it over", self.uri)
                if previous is not None and previous.owner != self.me and previous.expires > self.clock() \
                        and not previous.is_dead():
                    raise LeaseHeld(f"{self.uri} is held by {previous.describe()}; another run is writing this "
                                    f"output. Wait for it to finish, or if it is dead, wait until the lease "
                                    f"expires and re-run (or delete {self.uri})")
            mine = self._record()
            new = self.cell.swap(version, mine)
            if new is not None:
                self.version, self._acquired = new, Holder.parse(mine).acquired
                return previous
        raise LeaseHeld(f"{self.uri}: another run took the lease at the same moment; re-run later")

    def renew(self) -> bool:
        """Push the expiry forward; False (and ``lost`` set) when someone else took the lease."""
        new = self.cell.swap(self.version, self._record(self._acquired))
        if new is None:
            text, _ = self.cell.read()
            holder = Holder.parse(text).describe() if text else "no one (it was deleted)"
            self.lost = f"the lease {self.uri} was taken over by {holder}"
            return False
        self.version = new
        return True

    def release(self) -> None:
        if self.version is not None and not self.lost:
            if self.cell.swap(self.version, None) is None:
                log.warning("the lease %s changed hands before release; left as it is", self.uri)
        self.version = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    log.error("%s; this run stops at its next step", self.lost)
                    return
            except Exception as err:  # noqa: BLE001 - a missed renewal is retried at the next tick
                log.warning("renewing the lease %s failed (%s); retrying in %.0f s", self.uri, err,
                            self.ttl_s / 3)

    def check(self) -> None:
        """Raise LeaseLost when the background renewal found the lease taken over."""
        if self.lost:
            raise LeaseLost(f"{self.lost}; stopped so that two runs do not write one output. Re-run when "
                            f"the other run has finished")

    @contextmanager
    def held(self) -> Iterator["Lease"]:
        previous = self.acquire()
        if previous is not None:
            why = "whose process is gone" if previous.is_dead() else "whose lease expired"
            log.warning("took over the lease %s from %s, %s", self.uri, previous.describe(), why)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="sonosynth-lease", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=30)
            self.release()


__all__ = ["Holder", "Lease", "LeaseHeld", "LeaseLost"]
