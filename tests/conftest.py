"""Shared fixtures: the real sample data beside the checkout, and a real moto_server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from sonosynth.infra.local_s3 import moto_server

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SONOSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (set SONOSYNTH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3-compatible HTTP server (moto_server) on loopback for the whole session."""
    with moto_server() as url:
        yield url


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto server; AWS_ENDPOINT_URL points at it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory):
    """A real MLflow tracking server over HTTP (SQLite backend, served artifacts)."""
    from sonosynth.infra.local_mlflow import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="session")
def make_phantom_dataset():
    """Factory: ``make_phantom_dataset(dest, num, planes)`` ingests a phantom dataset."""
    return _make_phantom_dataset


def _make_phantom_dataset(dest: Path, num: int, planes: list[str], size: int = 96) -> Path:
    """A small real dataset written by the ingest stage (phantom cohort)."""
    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.infra.config import build

    cfg = build(IngestConfig, {"out": str(dest), "cohort": {"name": "phantom", "phantom": {
        "num": num, "height": size, "width": size, "planes": planes, "seed": 0}}})
    report = run_ingest(cfg, progress=False)
    assert report.ingested == num
    return dest


@pytest.fixture(autouse=True)
def _restore_mlflow_uris():
    """A stage run in-process (pipeline, promote) points MLflow's process-wide URIs (and so the
    MLFLOW_* variables subprocesses inherit) at its store; later tests must not inherit them."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    import sys

    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if "mlflow" in sys.modules:  # and MLflow's own globals, which set_*_uri cannot unset
        import mlflow.tracking._model_registry.utils as registry_utils
        import mlflow.tracking._tracking_service.utils as tracking_utils

        tracking_utils._tracking_uri = saved["MLFLOW_TRACKING_URI"]
        registry_utils._registry_uri = saved["MLFLOW_REGISTRY_URI"]
