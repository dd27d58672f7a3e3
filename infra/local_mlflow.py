"""A local MLflow tracking server (real HTTP) for tests, benchmarks and demos."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from sonosynth.infra.local_s3 import _free_port, serve
from sonosynth.infra.storage import BOTO_RETRY_DEFAULTS


@contextlib.contextmanager
def mlflow_server(root: str | Path, timeout_s: float = 90.0, port: int | None = None,
                  artifacts: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``mlflow server`` (SQLite backend, served artifacts under ``root`` or in
    ``artifacts``, e.g. ``s3://bucket/mlflow`` with ``MLFLOW_S3_ENDPOINT_URL`` in ``env``); yields its URL."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log, serve(
            [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", artifacts or str(root / "artifacts")],
            url + "/health", timeout_s, f"mlflow server on {url} (see {root / 'server.log'})",
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **BOTO_RETRY_DEFAULTS, **(env or {})}):
        yield url
