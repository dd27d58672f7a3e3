"""Shared fixtures: the real sample data beside the checkout, and a real moto_server."""

from __future__ import annotations

import os
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sonosynth.infra.local_s3 import moto_server

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SONOSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _session_caches(tmp_path_factory):
    """Caches (SAM embedding stores, s3:// shards) in the session's folder, never the home cache; shared by
    the session's tests and the processes they start."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SONOSYNTH_CACHE_DIR", str(tmp_path_factory.mktemp("caches")))
    yield
    patch.undo()


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
def flaky_s3_proxy(moto_endpoint):
    """One fault-injecting proxy (``FlakyS3Proxy``) in front of the session's moto_server, no faults at first."""
    from sonosynth.infra.local.flaky_s3 import flaky_s3

    with flaky_s3(moto_endpoint) as proxy:
        yield proxy


@pytest.fixture
def flaky_s3(flaky_s3_proxy):
    """The session's flaky S3 proxy, healed, without faults and with zeroed counters; enable faults with
    ``flaky_s3.set_faults(Faults(...))`` or ``flaky_s3.break_forever(pattern)``; its endpoint is ``flaky_s3.url``."""
    from sonosynth.infra.local.flaky_s3 import Faults

    flaky_s3_proxy.heal()
    flaky_s3_proxy.set_faults(Faults())
    flaky_s3_proxy.reset_counts()
    yield flaky_s3_proxy
    flaky_s3_proxy.heal()
    flaky_s3_proxy.set_faults(Faults())


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


class ReportPage(HTMLParser):
    """report.html read back: tables by id (rows of cell texts), image sources, text by element id."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.ids: dict[str, str] = {}
        self._table, self._cell, self._id, self._id_tag = None, None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        if attrs.get("id") and tag not in ("table", "img"):
            self._id, self._id_tag = attrs["id"], tag
            self.ids[self._id] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == self._id_tag:
            self._id = self._id_tag = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._id:
            self.ids[self._id] += data


@pytest.fixture(scope="session")
def read_report():
    """``read_report(path)``: a pipeline's report.html as a ``ReportPage``."""
    def read(path: Path) -> ReportPage:
        page = ReportPage()
        page.feed(Path(path).read_text())
        return page

    return read
