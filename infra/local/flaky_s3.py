"""A flaky S3 endpoint for tests: a loopback HTTP proxy in front of a real S3 server (moto_server)
that injects seeded, bounded faults (throttling, lost write acks, cut bodies, resets, latency).

    with moto_server() as s3, flaky_s3(s3, Faults(slowdown=0.5, max_count=3, seed=1)) as proxy:
        boto3.client("s3", endpoint_url=proxy.url, ...)
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Mapping
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

KINDS = ("reset", "slowdown", "lost_ack", "cut_body", "slow")
"""Fault kinds; when several are drawn for one request the first in this order wins (``slow`` combines)."""
WRITES = frozenset({"PUT", "POST", "DELETE"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "content-length"})
CHUNK = 1 << 16


@dataclass(frozen=True)
class Faults:
    slowdown: float = 0.0
    """Probability per request of a 503 SlowDown answer (the request is not forwarded)."""
    lost_ack: float = 0.0
    """Probability per PUT/POST/DELETE of forwarding it (it takes effect) and then answering 500 InternalError."""
    cut_body: float = 0.0
    """Probability per GET of sending a 200/206 answer's headers and only half its body, then closing."""
    reset: float = 0.0
    """Probability per request of resetting the connection (RST) without an answer; not forwarded."""
    slow: float = 0.0
    """Probability per request of sleeping ``slow_s`` before forwarding (combines with the other kinds)."""
    max_count: int | Mapping[str, int] | None = 3
    """Most injections of each kind under this config (a mapping: per kind, kinds absent unbounded; None: unbounded)."""
    seed: int = 0
    """Seed of the fault draws: the same request sequence after ``set_faults`` gives the same faults."""
    match: str | None = None
    """Regex searched in the URL-decoded path (``/bucket/key``); only matching requests draw faults."""
    slow_s: float | tuple[float, float] = (0.2, 1.0)
    """Delay of ``slow``: seconds, or a (low, high) range drawn uniformly."""

    def bound(self, kind: str) -> float:
        per_kind = self.max_count if isinstance(self.max_count, Mapping) else {kind: self.max_count}
        return float("inf") if per_kind.get(kind) is None else per_kind[kind]


def _applies(kind: str, method: str) -> bool:
    return (kind != "lost_ack" or method in WRITES) and (kind != "cut_body" or method == "GET")


class FlakyS3Proxy:
    """The proxy; ``url`` is its endpoint once started. Faults change at run time with ``set_faults``."""

    def __init__(self, upstream_url: str, faults: Faults | None = None):
        up = urlsplit(upstream_url)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.url = ""
        self._lock = threading.RLock()
        self._forever: list[tuple[re.Pattern[str], str]] = []
        self._counts = dict.fromkeys(KINDS, 0)
        self._events: list[tuple[str, str, str]] = []
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._faults, self._rng, self._used = Faults(), random.Random(), dict.fromkeys(KINDS, 0)
        self.set_faults(faults or Faults())

    def set_faults(self, faults: Faults) -> None:
        """Use ``faults`` from now on: reseeds the draws and restarts the ``max_count`` bounds."""
        per_kind = faults.max_count if isinstance(faults.max_count, Mapping) else {}
        if not set(per_kind) <= set(KINDS) or not all(0.0 <= getattr(faults, k) <= 1.0 for k in KINDS):
            raise ValueError(f"bad faults: {faults}")
        with self._lock:
            self._faults, self._rng, self._used = faults, random.Random(faults.seed), dict.fromkeys(KINDS, 0)

    def break_forever(self, pattern: str, kind: str = "slowdown") -> None:
        """Inject ``kind`` into every request whose path matches ``pattern`` (unbounded) until ``heal()``."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._forever.append((re.compile(pattern), kind))

    def heal(self) -> None:
        """Drop every ``break_forever`` rule (the ``Faults`` in force stay)."""
        with self._lock:
            self._forever.clear()

    @property
    def counts(self) -> dict[str, int]:
        """Kind -> faults injected since the last ``reset_counts``."""
        with self._lock:
            return dict(self._counts)

    @property
    def events(self) -> list[tuple[str, str, str]]:
        """(kind, method, path) of each injected fault, in order."""
        with self._lock:
            return list(self._events)

    def reset_counts(self) -> None:
        """Zero ``counts`` and clear ``events`` (the ``max_count`` bounds run on)."""
        with self._lock:
            self._counts = dict.fromkeys(KINDS, 0)
            self._events.clear()

    def _decide(self, method: str, path: str) -> tuple[str | None, float, bool]:
        """The fault for one request, the delay before it, and whether the fault is bounded. ``cut_body`` is
        only a candidate here: it is recorded once the answer turns out to have a body."""
        with self._lock:
            cfg = self._faults
            matches = cfg.match is None or re.search(cfg.match, path)
            drawn = [k for k in KINDS if self._rng.random() < getattr(cfg, k)] if matches else []
            forced = {k for rx, k in self._forever if rx.search(path)}
            kind, bounded, delay_s = None, True, 0.0
            for k, bnd in [(k, False) for k in KINDS if k in forced] + [(k, True) for k in drawn]:
                if k == "slow":
                    if not delay_s and self._record(k, method, path, bnd):
                        lo, hi = cfg.slow_s if isinstance(cfg.slow_s, tuple) else (cfg.slow_s, cfg.slow_s)
                        delay_s = self._rng.uniform(lo, hi)
                elif kind is None and _applies(k, method) and (k == "cut_body" or self._record(k, method, path, bnd)):
                    kind, bounded = k, bnd
            return kind, delay_s, bounded

    def _record(self, kind: str, method: str, path: str, bounded: bool) -> bool:
        """Count one injection; when ``bounded``, only while the kind's bound is not reached (else False)."""
        with self._lock:
            if bounded and self._used[kind] >= self._faults.bound(kind):
                return False
            self._used[kind] += 1
            self._counts[kind] += 1
            self._events.append((kind, method, path))
            return True

    def start(self) -> FlakyS3Proxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="flaky-s3", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:  # idle keep-alive connections would go on serving otherwise
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-answer is routine here, not worth a traceback


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FlakyS3Proxy
    _key = ""

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.owner._lock:
            self.owner._conns.discard(self.connection)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        self._key = unquote(urlsplit(self.path).path)
        kind, delay_s, bounded = self.owner._decide(self.command, self._key)
        if delay_s:
            time.sleep(delay_s)
        if kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()  # with linger 0 this sends RST, not FIN
            self.close_connection = True
            return
        if kind == "slowdown":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        # One upstream connection per request: moto_server closes each one after its answer anyway.
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            resp = self._forward(upstream, body)
            if kind == "lost_ack":
                return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
            self._relay(resp, cut=kind == "cut_body", bounded=bounded)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _forward(self, conn: http.client.HTTPConnection, body: bytes) -> http.client.HTTPResponse:
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            if k.lower() not in HOP_BY_HOP:
                conn.putheader(k, v)
        if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        return conn.getresponse()

    def _relay(self, resp: http.client.HTTPResponse, cut: bool, bounded: bool) -> None:
        length = resp.getheader("Content-Length")
        has_body = self.command != "HEAD" and resp.status not in (204, 304)
        data = resp.read() if has_body and length is None else b""
        cut = cut and resp.status in (200, 206) and bool(data or int(length or 0))
        cut = cut and self.owner._record("cut_body", self.command, self._key, bounded=bounded)
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        if length is not None or has_body:
            self.send_header("Content-Length", length if length is not None else str(len(data)))
        self.end_headers()
        if has_body and length is None:
            self.wfile.write(data[: len(data) // 2] if cut else data)
        elif has_body:
            left = int(length) // 2 if cut else int(length)
            while left > 0 and (chunk := resp.read(min(CHUNK, left))):
                self.wfile.write(chunk)
                left -= len(chunk)
        self.close_connection = self.close_connection or cut

    def _error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{escape(self._key)}</Resource><RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@contextlib.contextmanager
def flaky_s3(upstream_url: str, faults: Faults | None = None) -> Iterator[FlakyS3Proxy]:
    """A started ``FlakyS3Proxy`` in front of ``upstream_url`` (no faults unless given) until the block ends."""
    proxy = FlakyS3Proxy(upstream_url, faults).start()
    try:
        yield proxy
    finally:
        proxy.stop()
