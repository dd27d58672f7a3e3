"""A local S3-compatible server (moto_server, real HTTP) for tests, benchmarks and demos."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(args: list[str], health_url: str, timeout_s: float, what: str, **popen) -> Iterator[subprocess.Popen]:
    """Run a local server until the block ends; waits until ``health_url`` answers."""
    proc = subprocess.Popen(args, **popen)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                urllib.request.urlopen(health_url, timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start") from None
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def moto_server(timeout_s: float = 30.0) -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port; yields its endpoint URL."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not os.path.exists(exe):
        raise RuntimeError("moto_server not found: pip install 'moto[server]' (make install does)")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with serve([exe, "-H", "127.0.0.1", "-p", str(port)], url + "/moto-api/", timeout_s,
               f"moto_server on {url}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        yield url


def use_endpoint(url: str) -> None:
    """Point boto3 at ``url`` with dummy credentials (what a local server accepts)."""
    os.environ["AWS_ENDPOINT_URL"] = url
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(var, value)
