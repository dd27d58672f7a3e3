"""generate on a real 2-node Ray cluster on loopback: a head (`ray start --head`) and a worker node
(`ray start --address`), token auth on. Sampler actors land on both nodes, the output is exactly N
unique samples, and killing the worker node at any moment (early, mid-run, during the last shards)
still ends the same run, exit 0, with exactly N samples, byte for byte those of an uninterrupted run:
no re-run. Each kill is followed by a fresh worker node joining, as KubeRay replaces a lost pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sonosynth.infra.local import stack

pytestmark = pytest.mark.integration
SONOSYNTH = str(Path(sys.executable).with_name("sonosynth"))
N = 32  # 16 shards: room to kill the worker node mid-run even when its actor starts late (a loaded CI)
ARGS = ["--num-samples", str(N), "--set", "shard_size=2", "--set", "tracking.enabled=false", "--no-progress"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head with 1 CPU and one worker node with 1 CPU: one sampler actor fits on each."""
    folder = tmp_path_factory.mktemp("two-nodes") / "stack"
    try:
        state = stack.up(folder, ray_cpus=1, worker_nodes=1, worker_cpus=1, mlflow=False, s3=False)
        yield folder, state
    finally:
        stack.down(folder)


def env_for(state) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, **{k: v for k, v in stack.client_env(state).items() if k.startswith("RAY_")}}


def samplers_under(pid: int) -> list[int]:
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in kids:
        try:
            if "SamplerWorker" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def start(state, tiny_lora: Path, out: Path) -> subprocess.Popen:
    args = [SONOSYNTH, "generate", "generate_tiny", "--out", str(out), "--lora", str(tiny_lora), *ARGS,
            "--address", state["services"]["ray-head"]["gcs"]]
    return subprocess.Popen(args, cwd=out.parent, env=env_for(state), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def watch_placement(proc: subprocess.Popen, state, until) -> dict[str, set[int]]:
    """Poll which node's process tree holds sampler actors until ``until()`` or the job ends."""
    seen: dict[str, set[int]] = {"ray-head": set(), "ray-worker-1": set()}
    deadline = time.monotonic() + 300
    while not until() and proc.poll() is None:
        assert time.monotonic() < deadline, "the job made no progress"
        for name in seen:
            seen[name].update(samplers_under(state["services"][name]["pid"]))
        time.sleep(0.1)
    return seen


def finish(proc: subprocess.Popen, timeout: int = 500) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_lora, tmp_path_factory):
    folder, state = cluster
    out = tmp_path_factory.mktemp("two-nodes-out") / "uninterrupted"
    proc = start(state, tiny_lora, out)
    seen = watch_placement(proc, state, lambda: False)
    return out, seen, finish(proc)


def test_actors_land_on_both_nodes_and_deliver_exactly_n(uninterrupted, fingerprint):
    out, seen, output = uninterrupted
    assert seen["ray-head"] and seen["ray-worker-1"], f"sampler actors per node: {seen}"
    summary = json.loads((out / "summary.json").read_text())
    prints = fingerprint(out)
    assert summary["accepted"] == len(prints) == N and f"generated {N}/{N}" in output
    assert sorted(int(k.rsplit("-", 1)[1]) for k in prints) == list(range(N))


SHARDS = N // 2
KILL_MOMENTS = {
    # the worker node's actor exists (it may still be loading its model); nothing is done yet
    "early": lambda done: done == 0,
    # about half the shards are done
    "middle": lambda done: SHARDS // 2 - 1 <= done < SHARDS - 2,
    # every task is handed out (2 actors x 2 in flight), so the worker's actor, alive only while it
    # holds work, is drawing one of the last shards
    "last": lambda done: SHARDS - 2 <= done < SHARDS,
}


@pytest.fixture
def worker_node(cluster) -> str:
    """The live worker node: the first one, or a fresh one joined after a kill."""
    folder, _ = cluster
    state = stack.load_state(folder)
    live = [n for n in state["services"] if n.startswith("ray-worker") and not state["services"][n].get("killed")]
    return live[-1] if live else stack.add_worker_node(folder, num_cpus=1)


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_killing_the_worker_node_ends_with_exactly_n_without_a_rerun(cluster, tiny_lora, tmp_path, uninterrupted,
                                                                     worker_node, moment, fingerprint):
    folder, state = cluster
    out = tmp_path / f"node-killed-{moment}"
    proc = start(state, tiny_lora, out)
    node_pid = stack.load_state(folder)["services"][worker_node]["pid"]

    def done() -> int:
        return len(list((out / "_done").glob("*.json"))) if (out / "_done").is_dir() else 0

    def moment_reached() -> bool:
        return bool(samplers_under(node_pid)) and KILL_MOMENTS[moment](done())

    deadline = time.monotonic() + 300
    while not moment_reached():
        assert proc.poll() is None, f"the job ended before the {moment} moment: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"the {moment} moment never came ({done()} shards done)"
        time.sleep(0.05)
    done_at_kill = done()
    killed = stack.kill_service(folder, worker_node)  # raylet, agents and the sampler actor at once
    assert killed >= 2 and proc.poll() is None, f"too late to kill at the {moment} moment"
    output = finish(proc)  # exit 0 in this one run: no re-run clause
    prints = fingerprint(out)
    assert len(prints) == N and json.loads((out / "summary.json").read_text())["accepted"] == N
    assert prints == fingerprint(uninterrupted[0])  # the same samples as the uninterrupted run
    assert f"generated {N}/{N}" in output and done_at_kill < SHARDS


TOY = Path(__file__).with_name("toy_task.py")
TOY_DRIVER = ("import importlib.util, sys\n"
              "spec = importlib.util.spec_from_file_location('toy_task', sys.argv[1])\n"
              "toy = importlib.util.module_from_spec(spec); sys.modules['toy_task'] = toy\n"
              "spec.loader.exec_module(toy); toy.main(sys.argv[2:])\n")


def test_a_training_job_whose_worker_node_dies_resumes_from_its_last_checkpoint(cluster, worker_node, tmp_path,
                                                                              procs):
    """Ray Train on the same two nodes, one rank on each: the worker node is killed after the
    first checkpoint, a fresh node joins (as KubeRay replaces a pod), Ray Train restarts the
    worker group and the engine resumes from the checkpoint: one run, exit 0, every step."""
    folder, state = cluster
    out = tmp_path / "toy"
    args = [sys.executable, "-c", TOY_DRIVER, str(TOY), str(out), f"ray.address={state['services']['ray-head']['gcs']}",
            "engine.workers=2", "engine.cpus_per_worker=1", "engine.max_steps=20", "engine.checkpoint_every=5",
            "engine.max_failures=2", "engine.progress=false", "engine.loader_workers=1", "tracking.enabled=false",
            "step_sleep_s=0.1"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env_for(state), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    node_pid = stack.load_state(folder)["services"][worker_node]["pid"]
    procs.wait_until(lambda: procs.checkpoint(out, 5).exists(), proc, timeout=300, what="the first checkpoint")
    assert any("RayTrainWorker" in " ".join(p.cmdline()) for p in _children(node_pid)), "no rank on the worker node"
    stack.kill_service(folder, worker_node)
    stack.add_worker_node(folder, num_cpus=1)  # the replacement node the restarted worker group needs
    output = finish(proc, timeout=400)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 5 and summary["workers"] == 2, summary
    assert "resuming from checkpoint step" in output


def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
