"""Two pipelines never write one output at once: real `sonosynth pipeline` processes into a local
folder and into S3 (moto_server). The second is refused while the first runs, naming it; the
lease of a killed run expires and the next run takes it over and resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
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


def lease_uri(out: str) -> str:
    return f"{out}/_pipeline/lease.json" if "://" in out else str(Path(out) / "_pipeline" / "lease.json")


def lease_of(out: str) -> dict | None:
    from sonosynth.infra.storage import open_storage

    store = open_storage(out)
    return json.loads(store.get_text("_pipeline/lease.json")) if store.exists("_pipeline/lease.json") else None


def wait_for_lease(out: str, proc, procs) -> dict:
    procs.wait_until(lambda: lease_of(out) is not None, proc, timeout=120, what="the first pipeline")
    return lease_of(out)


def test_a_second_pipeline_into_the_same_output_is_refused_while_the_first_runs(tmp_path, out, procs):
    path = recipe(tmp_path, out)
    first = procs.start(["pipeline", str(path), "--no-progress"])
    holder = wait_for_lease(out, first, procs)
    assert holder["pid"] == first.pid
    second = procs.cli(["pipeline", str(path), "--no-progress"], timeout=300, check=False)
    assert first.poll() is None, "the first run ended before the second tried"
    assert second.returncode == 1, second.stderr
    assert f"pid {first.pid}" in second.stderr and "lease.json is held by pipeline" in second.stderr
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert lease_of(out) is None  # released at the end
    again = procs.cli(["pipeline", str(path), "--no-progress"], timeout=300, check=False)
    assert again.returncode == 0 and "done earlier, skipped" in again.stdout, again.stderr[-3000:]


def test_a_killed_pipeline_frees_its_output_at_once_and_the_next_run_resumes(tmp_path, out, procs):
    path = recipe(tmp_path, out)
    first = procs.start(["pipeline", str(path), "--no-progress"])
    wait_for_lease(out, first, procs)
    time.sleep(1.5)  # some shards written
    procs.kill_tree(first)
    resumed = procs.cli(["pipeline", str(path), "--no-progress"], timeout=600)
    assert f"took over the lease {lease_uri(out)} from" in resumed.stderr and f"pid {first.pid}" in resumed.stderr
    assert "whose process is gone" in resumed.stderr
    assert "ingested 1500 samples" in resumed.stdout and lease_of(out) is None


def test_the_lease_of_a_run_on_another_host_is_honoured_until_it_expires(tmp_path, out, procs):
    """A pod that was lost: its process cannot be seen from here, so only the expiry frees the output."""
    from sonosynth.infra.storage import open_storage

    path = recipe(tmp_path, out)
    now, life = time.time(), 12.0  # well past this CLI's start-up, so the first try meets a live lease
    open_storage(out).put_text("_pipeline/lease.json", json.dumps({
        "owner": "ray-head-7f9c-812-1", "host": "ray-head-7f9c", "pid": 812, "purpose": "pipeline nightly_heads",
        "acquired": now, "expires": now + life}))
    refused = procs.cli(["pipeline", str(path), "--no-progress"], timeout=300, check=False)
    assert refused.returncode == 1, refused.stdout[-2000:]
    assert "held by pipeline nightly_heads (owner ray-head-7f9c-812-1, host ray-head-7f9c" in refused.stderr
    time.sleep(max(0.0, now + life - time.time()) + 0.5)
    resumed = procs.cli(["pipeline", str(path), "--no-progress"], timeout=600)
    assert resumed.returncode == 0 and "whose lease expired" in resumed.stderr, resumed.stderr[-3000:]
    assert "ingested 1500 samples" in resumed.stdout and lease_of(out) is None
