"""Two pipelines never write one output at once: real `sonosynth pipeline` processes into a local
folder and into S3 (moto_server). The second is refused while the first runs, naming it; the
lease of a killed run expires and the next run takes it over and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
SONOSYNTH = str(Path(sys.executable).with_name("sonosynth"))
TTL = 6


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "nightly")
    return f"s3://{request.getfixturevalue('s3_bucket')}/nightly"


def recipe(tmp_path: Path, out: str) -> Path:
    """One ingest long enough (a few seconds) to be caught running."""
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump({"out": out, "tracking": {"enabled": False}, "lease": {"ttl_s": TTL},
                                    "stages": {"real": {"stage": "ingest", "cohort": {"name": "phantom", "phantom": {
                                        "num": 1500, "height": 96, "width": 96, "seed": 0}},
                                        "shards": {"max_samples": 100}}}}))
    return path


def start(path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([SONOSYNTH, "pipeline", str(path), "--no-progress"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def lease_of(out: str) -> dict | None:
    from sonosynth.infra.storage import open_storage

    store = open_storage(out)
    return json.loads(store.get_text("_pipeline/lease.json")) if store.exists("_pipeline/lease.json") else None


def wait_for_lease(out: str, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 120
    while (holder := lease_of(out)) is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return holder


def test_a_second_pipeline_into_the_same_output_is_refused_while_the_first_runs(tmp_path, out):
    path = recipe(tmp_path, out)
    first = start(path)
    holder = wait_for_lease(out, first)
    assert holder["pid"] == first.pid
    second = subprocess.run([SONOSYNTH, "pipeline", str(path), "--no-progress"], capture_output=True, text=True,
                            timeout=300)
    assert first.poll() is None, "the first run ended before the second tried"
    assert second.returncode == 1, second.stderr
    assert f"pid {first.pid}" in second.stderr and "lease.json is held by pipeline" in second.stderr
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert lease_of(out) is None  # released at the end
    again = subprocess.run([SONOSYNTH, "pipeline", str(path), "--no-progress"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "done earlier, skipped" in again.stdout, again.stderr[-3000:]


def test_the_lease_of_a_killed_pipeline_expires_and_the_next_run_resumes(tmp_path, out):
    path = recipe(tmp_path, out)
    first = start(path)
    holder = wait_for_lease(out, first)
    time.sleep(1.5)  # some shards written
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    refused = subprocess.run([SONOSYNTH, "pipeline", str(path), "--no-progress"], capture_output=True, text=True,
                             timeout=300)
    if refused.returncode == 1:  # the lease was still live
        assert f"pid {first.pid}" in refused.stderr and "expires" in refused.stderr, refused.stderr[-2000:]
        time.sleep(max(0.0, holder["expires"] - time.time()) + TTL)
        resumed = subprocess.run([SONOSYNTH, "pipeline", str(path), "--no-progress"], capture_output=True,
                                 text=True, timeout=600)
    else:  # this machine was slower than the lease: the first try already took it over
        resumed = refused
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took over the expired lease" in resumed.stderr and f"pid {first.pid}" in resumed.stderr
    assert "ingested 1500 samples" in resumed.stdout and lease_of(out) is None
