"""The output lease: one holder at a time, on a local folder and on a real S3 server (moto_server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from sonosynth.infra.lease import Lease, LeaseHeld, LeaseLost

KEY = "_pipeline/lease.json"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/nightly"


def read_holder(root: str) -> dict:
    from sonosynth.infra.storage import open_storage

    return json.loads(open_storage(root).get_text(KEY))


def test_a_second_taker_is_refused_with_the_holder_named_until_release(root):
    first = Lease(root, KEY, ttl_s=60, purpose="pipeline nightly")
    assert first.acquire() is None
    holder = read_holder(root)
    assert holder["purpose"] == "pipeline nightly" and holder["expires"] > time.time() + 50
    with pytest.raises(LeaseHeld, match=rf"held by pipeline nightly \(owner {first.me}, host .*pid \d+"):
        Lease(root, KEY, ttl_s=60).acquire()
    first.release()
    second = Lease(root, KEY, ttl_s=60)
    assert second.acquire() is None
    second.release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_finds_out(root):
    now = [1000.0]
    dead = Lease(root, KEY, ttl_s=30, clock=lambda: now[0])
    dead.acquire()  # and never renewed: its process died
    now[0] += 29
    with pytest.raises(LeaseHeld):
        Lease(root, KEY, ttl_s=30, clock=lambda: now[0]).acquire()
    now[0] += 2
    heir = Lease(root, KEY, ttl_s=30, clock=lambda: now[0])
    previous = heir.acquire()
    assert previous is not None and previous.owner == dead.me
    assert read_holder(root)["owner"] == heir.me
    # the old holder wakes up: its renewal fails, and it stops instead of writing on
    assert dead.renew() is False and "taken over by" in dead.lost
    with pytest.raises(LeaseLost, match="two runs"):
        dead.check()
    dead.release()  # must not delete the heir's lease
    assert read_holder(root)["owner"] == heir.me
    heir.release()


def test_a_live_holder_keeps_its_lease_past_the_ttl_by_renewing_it(root):
    lease = Lease(root, KEY, ttl_s=3)
    with lease.held():
        first_expiry = read_holder(root)["expires"]
        time.sleep(4.5)  # past the first expiry: renewed every second
        assert read_holder(root)["expires"] > first_expiry
        with pytest.raises(LeaseHeld):
            Lease(root, KEY, ttl_s=3).acquire()
        lease.check()
    from sonosynth.infra.storage import open_storage

    assert not open_storage(root).exists(KEY)  # released at the end of the block


RACE = """
import sys, time
from sonosynth.infra.lease import Lease, LeaseHeld
lease = Lease(sys.argv[1], "_pipeline/lease.json", ttl_s=60)
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lease.acquire()
    print("won")
except LeaseHeld:
    print("refused")
"""


def test_of_racing_processes_exactly_one_wins(root, monkeypatch):
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", RACE, root, str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert results == ["refused", "refused", "refused", "won"], results


def test_a_bad_ttl_is_refused():
    with pytest.raises(ValueError, match="ttl_s must be positive"):
        Lease("/tmp/x", KEY, ttl_s=0)


def test_a_holder_whose_process_is_gone_from_this_host_loses_the_lease_at_once(root):
    import socket

    from sonosynth.infra.storage import open_storage

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, now = int(gone.stdout), time.time()
    for host, taken in (("another-host", False), (socket.gethostname(), True)):
        open_storage(root).put_text(KEY, json.dumps({"owner": f"{host}-{dead_pid}", "host": host, "pid": dead_pid,
                                                     "acquired": now, "expires": now + 600}))
        lease = Lease(root, KEY, ttl_s=60)
        if taken:
            assert lease.acquire().host == host and read_holder(root)["owner"] == lease.me
            lease.release()
        else:  # its process cannot be seen from here: only the expiry frees the output
            with pytest.raises(LeaseHeld, match="host another-host"):
                lease.acquire()
