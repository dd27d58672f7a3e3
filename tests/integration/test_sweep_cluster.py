"""A tiny replicated sweep (train-sam + evaluate, 2 N x 2 arms x 2 seeds) on a real 2-node Ray cluster on
loopback (a head and a worker node of 1 CPU each), tracked on a real MLflow server over HTTP.

The sweep runs one run after another in the CLI's process, is killed after two runs and started again:
its interval tables, read back from MLflow. Then the second seed's four runs are deleted and the sweep is
submitted as a Ray job (`sonosynth submit -- sweep --parallel 2`): those runs train again two at once, one
per node, and the tables come out byte for byte the same."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from sonosynth.infra.local import stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head with 1 CPU and one worker node with 1 CPU: one run's training worker fits on each."""
    folder = tmp_path_factory.mktemp("sweep-nodes") / "stack"
    try:
        yield stack.up(folder, ray_cpus=1, worker_nodes=1, worker_cpus=1, mlflow=False, s3=False)
    finally:
        stack.down(folder)


def sweep_recipe(path: Path, dataset: Path, mlflow_url: str) -> Path:
    real = {"dataset": str(dataset), "split": "train"}
    path.write_text(yaml.safe_dump({
        "stage": "train-sam", "recipe": "sam_tiny",
        "set": {"data.sources.real": real, "data.val.count": 2, "engine.workers": 1, "engine.max_steps": 4,
                "engine.eval_every": 4, "engine.checkpoint_every": 4, "engine.log_every": 2,
                "engine.best_metric": None, "optim.lr": 1.0e-3},
        "grid": {"n_real": {"4": {"data.sources.real.count": 4}, "8": {"data.sources.real.count": 8}},
                 "arm": {"real": {}, "weak": {"data.augment.preset": "weak"}}},
        "seeds": [0, 1], "baseline": {"arm": "real"},
        "evaluate": {"dataset": str(dataset), "split": "test", "set": {"box_draws": 1, "worst_cases": 0}},
        "metrics": ["eval:dice_mean", "train:val/loss"], "reference_metric": "eval:box_baseline_dice_mean",
        "tracking": {"uri": mlflow_url}}, sort_keys=False))
    return path


def finished_runs(out: Path) -> int:
    return len(list(out.glob("n_real-*/summary.json")))


def test_parallel_runs_on_two_nodes_give_the_table_of_a_killed_and_resumed_sequential_sweep(
        cluster, tmp_path, procs, make_phantom_dataset, mlflow_url):
    dataset = make_phantom_dataset(tmp_path / "phantom", 24, ["brain"], size=64)
    recipe = sweep_recipe(tmp_path / "sweep.yaml", dataset, mlflow_url)
    env = {**procs.env(), **stack.client_env(cluster)}
    out = tmp_path / "sweep"
    tables = ("results.csv", "differences.csv", "runs.csv")

    proc = procs.start(["sweep", str(recipe), "--out", str(out), "--parallel", "1"], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 300
    while finished_runs(out) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no run finished in 5 minutes"
        time.sleep(0.5)
    procs.kill_tree(proc)
    assert not (out / "results.csv").exists()
    procs.cli(["sweep", str(recipe), "--out", str(out), "--parallel", "1"], cwd=tmp_path, env=env)
    sequential = {name: (out / name).read_text() for name in tables}
    header, *cells = sequential["results.csv"].splitlines()
    assert len(cells) == 4 and "eval:dice_mean:lo" in header and "train:val/loss:hi" in header
    assert "Paired differences against arm=real" in (out / "results.md").read_text()
    assert (out / "eval_dice_mean_vs_n_real.png").stat().st_size > 10_000
    runs = list(csv.DictReader(io.StringIO(sequential["runs.csv"])))
    assert len({r["train:val/loss"] for r in runs}) == 8, "each run has its own figures: the comparison means something"

    for run in out.glob("n_real-*__seed-1"):
        shutil.rmtree(run)
    job = procs.cli(["submit", "--package", "image", "--wait", "--", "sweep", str(recipe), "--out", str(out),
                     "--parallel", "2"], cwd=tmp_path, env=env)
    assert "2 at once" in job.stdout + job.stderr
    assert {name: (out / name).read_text() for name in tables} == sequential

    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert len(runs) == 8 and not any(r.get("error") for r in runs)
    again = sorted((r["start"], r["end"]) for r in runs if r["seed"] == 1)
    assert any(b[0] < a[1] for a, b in zip(again, again[1:])), f"no two runs were in flight at once: {again}"
    assert all((out / r["run"] / "eval" / "summary.json").is_file() for r in runs)
