"""k8s/base/rayjob_cleanup.py: which finished RayJobs the daily cleanup deletes (a fake API)."""

from __future__ import annotations

import importlib.util
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "k8s" / "base" / "rayjob_cleanup.py"
NOW = datetime(2026, 9, 1, 3, 30, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def cleanup():
    spec = importlib.util.spec_from_file_location("sonosynth_k8s_rayjob_cleanup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job(name: str, deployment: str | None, status: str | None = None, days_ago: float | None = None,
        created_days_ago: float = 60, **meta) -> dict:
    stamp = lambda days: (NOW - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    status_ = {k: v for k, v in (("jobDeploymentStatus", deployment), ("jobStatus", status)) if v}
    if days_ago is not None:
        status_["endTime"] = stamp(days_ago)
    return {"metadata": {"name": name, "creationTimestamp": stamp(created_days_ago), **meta}, "status": status_}


JOBS = [
    job("ok-new", "Complete", "SUCCEEDED", days_ago=6.9),
    job("ok-old", "Complete", "SUCCEEDED", days_ago=7.1),
    job("failed-new", "Failed", "FAILED", days_ago=29),
    job("failed-old", "Failed", "FAILED", days_ago=31),
    job("stopped-old", "Complete", "STOPPED", days_ago=8),           # not a success: kept 30 days
    job("refused-old", "ValidationFailed", created_days_ago=40),     # no endTime: its creation
    job("running", "Running", "RUNNING", created_days_ago=90),
    job("retrying", "Retrying", created_days_ago=90),
    job("suspended", "Suspended", created_days_ago=90),
    job("new", None, created_days_ago=90),
    job("deleting", "Complete", "SUCCEEDED", days_ago=90, deletionTimestamp="2026-08-31T00:00:00Z"),
]


class FakeApi:
    def __init__(self, pages: list[list[dict]]):
        self.pages, self.calls = pages, []

    def call(self, method: str, path: str) -> dict:
        self.calls.append((method, path))
        if method == "DELETE":
            return {}
        index = len([c for c in self.calls if c[0] == "GET"]) - 1
        more = {"continue": f"tok/{index}"} if index + 1 < len(self.pages) else {}
        return {"items": self.pages[index], "metadata": more}


def test_only_finished_rayjobs_past_their_keep_time_are_due(cleanup):
    week, month = timedelta(days=7), timedelta(days=30)
    due = {j["metadata"]["name"] for j in JOBS if cleanup.due(j, NOW, week, month)}
    assert due == {"ok-old", "failed-old", "refused-old"}


def test_main_pages_through_the_namespace_and_deletes_the_due_ones(cleanup, capsys, monkeypatch):
    monkeypatch.setenv("KEEP_SUCCEEDED_DAYS", "7")
    monkeypatch.delenv("KEEP_FAILED_DAYS", raising=False)
    api = FakeApi([JOBS[:5], JOBS[5:]])
    assert cleanup.main(api, "sonosynth", NOW) == 0
    base = "/apis/ray.io/v1/namespaces/sonosynth/rayjobs"
    assert api.calls == [("GET", f"{base}?limit=200"), ("GET", f"{base}?limit=200&continue=tok/0"),
                         ("DELETE", f"{base}/ok-old"), ("DELETE", f"{base}/failed-old"),
                         ("DELETE", f"{base}/refused-old")]
    out = capsys.readouterr().out
    assert "deleted RayJob ok-old: Complete SUCCEEDED" in out and "3 of 11 RayJobs in sonosynth deleted" in out
