"""The engine with a task it has never seen: the toy task of toy_task.py, 2 real ranks on a local Ray.

The toy module is loaded from its file (it is not importable on the Ray workers), so the job
reaches the workers by value. Checked: evaluation every few steps on all ranks with reduced
results, the best checkpoint by its metric exported as the model, config and lineage logged
by the engine, and a killed job that resumes to the same weights and the same batches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
TOY = Path(__file__).with_name("toy_task.py")
DRIVER = ("import importlib.util, sys\n"
          "spec = importlib.util.spec_from_file_location('toy_task', sys.argv[1])\n"
          "toy = importlib.util.module_from_spec(spec); sys.modules['toy_task'] = toy; spec.loader.exec_module(toy)\n"
          "toy.main(sys.argv[2:])\n")
STEPS = 40
JOB = [f"engine.max_steps={STEPS}", "engine.eval_every=5", "engine.checkpoint_every=10", "engine.log_every=5",
       "engine.best_metric=val/acc", "engine.micro_batch=4", "engine.grad_accum=2", "engine.loader_workers=1",
       "engine.progress=false", "optim.lr=0.01"]


def load_toy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_task_local", TOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def driver(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, str(TOY), str(out), *JOB, *args]


def run_job(cmd: list[str], cwd: Path, procs) -> dict:
    """Run a job to its end; its summary.json."""
    proc = subprocess.run(cmd, cwd=cwd, env=procs.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((Path(cmd[4]) / "summary.json").read_text())


def batches(record: Path, rank: int) -> list[tuple[int, list[int]]]:
    """(step, example indices) of every micro-batch the rank trained on, in order."""
    lines = (record / f"batches-rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["indices"]) for r in map(json.loads, lines)]


def last_step(record: Path) -> int:
    """The last step rank 0 has started (read while the job writes)."""
    try:
        return json.loads((record / "batches-rank0.jsonl").read_text().splitlines()[-1])["step"]
    except (FileNotFoundError, IndexError, ValueError):
        return -1


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-toy")


@pytest.fixture(scope="module")
def reference(work, procs) -> tuple[Path, Path, dict, str]:
    """One uninterrupted job, tracked in a local MLflow store."""
    out, record, uri = work / "ref", work / "ref-record", f"sqlite:///{work / 'mlflow.db'}"
    summary = run_job(driver(out, f"record={record}", f"tracking.uri={uri}"), work, procs)
    return out, record, summary, uri


def test_best_evaluation_is_exported_by_its_metric(reference):
    out, record, s, uri = reference
    from mlflow import MlflowClient

    assert s["workers"] == 2 and s["steps"] == STEPS and s["task"] == "toy" and s["eval_examples"] == 50
    client = MlflowClient(uri)
    run_id = s["mlflow"]["run_id"]
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "val/acc")]
    assert [step for step, _ in history] == list(range(0, STEPS + 1, 5))  # start, every 5 steps, end
    trained = [(step, v) for step, v in history if step > 0]
    best_value = max(v for _, v in trained)
    best_step = next(step for step, v in trained if v == best_value)  # ties keep the first
    best = s["best"]
    assert (best["metric"], best["mode"], best["step"]) == ("val/acc", "max", best_step)
    assert best["value"] == pytest.approx(best_value)
    assert 0 < best_step < STEPS, "the toy's accuracy peaks early; the test needs best != last"

    # The model is the best evaluation's weights, not the last step's.
    exported = weights(out / "model" / "weights.pt")
    assert_same(weights(record / f"eval-{best_step}.pt"), exported)
    assert any(not torch.equal(exported[k], v) for k, v in weights(record / f"eval-{STEPS}.pt").items())
    assert s["lineage"]["training"]["exported_step"] == best_step
    assert json.loads((out / "model" / "lineage.json").read_text()) == s["lineage"]
    assert [p.name for p in (out / "best").iterdir()] == [f"step-{best_step:08d}.pt"]

    # Every rank evaluated its share and the sums were reduced: the reported figures are the
    # whole validation set's, recomputed here from the exported weights.
    toy = load_toy()
    val, net = toy.Blobs(50, seed=2, augment=False), toy.ToyNet()
    net.load_state_dict(exported)
    with torch.no_grad():
        logits = net.net(val.x)
    assert best["metrics"]["val/acc"] == pytest.approx((logits.argmax(1) == val.y).float().mean().item())
    assert best["metrics"]["val/loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, val.y).item(), rel=1e-5)


def test_engine_logs_config_lineage_and_forward_metrics_for_any_task(reference):
    _, _, s, uri = reference
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(s["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["engine.workers"] == "2" and run.data.params["engine.best_metric"] == "val/acc"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "lineage.json", "model", "summary.json"} <= artifacts
    for name in ("train/loss", "train/acc"):  # forward's metrics, averaged across ranks
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(5, STEPS + 1, 5))
    assert run.data.metrics["train/acc"] > 0.8


def test_killed_job_resumes_to_the_same_weights_and_batches(work, reference, procs):
    ref_out, ref_record, ref, _ = reference
    out, record = work / "killed", work / "killed-record"
    cmd = driver(out, f"record={record}", "tracking.enabled=false", "step_sleep_s=0.04")
    proc = subprocess.Popen(cmd, cwd=work, env=procs.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        procs.wait_until(lambda: procs.checkpoint(out, 10).exists() and last_step(record) >= 13, proc,
                         timeout=200, what="the toy job, before step 13")
    finally:
        procs.kill_tree(proc)
    assert not (out / "summary.json").exists(), "the job finished before it was killed"

    s = run_job(cmd, work, procs)
    assert s["resumed_from_step"] >= 10
    assert_same(weights(ref_record / f"eval-{STEPS}.pt"), weights(record / f"eval-{STEPS}.pt"))
    assert_same(weights(ref_out / "model" / "weights.pt"), weights(out / "model" / "weights.pt"))
    assert s["best"] == ref["best"]

    # Every micro-batch of every step, including the steps done twice (after the checkpoint and
    # before the kill, then again after the resume), holds the examples of the uninterrupted job.
    redone = set()
    for rank in range(2):
        expected: dict[int, list] = defaultdict(list)
        for step, indices in batches(ref_record, rank):
            expected[step].append(indices)
        seen: dict[int, list] = defaultdict(list)
        for step, indices in batches(record, rank):
            seen[step].append(indices)
        assert sorted(seen) == sorted(expected) == list(range(STEPS))
        for step, lines in seen.items():
            tries: list[list] = []  # one per time the step was trained (the kill may cut one short)
            for indices in lines:
                if indices == expected[step][0]:
                    tries.append([])
                tries[-1].append(indices)
            assert all(t == expected[step][:len(t)] for t in tries) and tries[-1] == expected[step], (rank, step)
            if len(tries) > 1:
                redone.add(step)
    assert redone and min(redone) == s["resumed_from_step"], redone
