"""add_worker_node's error path: a worker node whose `ray start` gives up is started once more, and the
second failure is raised (the processes of each failed try are killed). The real start is covered by the
2-node integration tests."""

from __future__ import annotations

import pytest

from sonosynth.infra.local import stack


@pytest.fixture
def fake_head(monkeypatch, tmp_path):
    state = {"id": "s1", "folder": str(tmp_path), "services": {"ray-head": {"gcs": "127.0.0.1:1", "pid": 1}},
             "token_file": str(tmp_path / "token")}
    calls = {"spawned": [], "killed": [], "fail": 1}
    monkeypatch.setattr(stack, "load_state", lambda folder: state)
    monkeypatch.setattr(stack, "_ray_env", lambda state: {})

    def spawn(state, name, args, env, **record):
        entry = {"pid": 100 + len(calls["spawned"]), "log": "x.log", "cmd": args}
        calls["spawned"].append(args)
        state["services"][name] = entry
        return entry

    def wait_until(state, name, check, timeout_s):
        if len(calls["spawned"]) <= calls["fail"]:
            raise stack.StackError(f"{name} exited while starting")

    monkeypatch.setattr(stack, "_spawn", spawn)
    monkeypatch.setattr(stack, "_wait_until", wait_until)
    monkeypatch.setattr(stack, "_signal_group", lambda pid, stack_id, sig: calls["killed"].append(pid))
    return tmp_path, calls


def test_a_worker_node_that_gives_up_is_started_again(fake_head):
    folder, calls = fake_head
    assert stack.add_worker_node(folder, 1, timeout_s=1) == "ray-worker-1"
    assert len(calls["spawned"]) == 2 and calls["killed"] == [100]


def test_a_worker_node_that_gives_up_twice_is_an_error(fake_head):
    folder, calls = fake_head
    calls["fail"] = 2
    with pytest.raises(stack.StackError, match="exited while starting"):
        stack.add_worker_node(folder, 1, timeout_s=1)
    assert calls["killed"] == [100, 101]
