"""A real local Ray: what its workers print goes to one file per worker, and their steps to the driver's bar."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sonosynth.infra.cluster import RayConfig, connect
from sonosynth.infra.console import logs_to
from sonosynth.infra.progress import StepReporter, remote_progress


@pytest.fixture(scope="module")
def ray_here():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    connect(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


def wait_for(folder: Path, prefix: str, text: str, timeout: float = 30) -> str:
    """The content of the file ``prefix*`` in ``folder`` once it holds ``text`` (Ray forwards within seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in folder.glob(f"{prefix}*.log"):
            if text in f.read_text():
                return f.name
        time.sleep(0.2)
    found = {f.name: f.read_text()[-300:] for f in folder.glob("*.log")} if folder.exists() else None
    raise AssertionError(f"no {prefix}*.log holding {text!r} in {folder}: {found}")


def test_what_tasks_and_actors_print_goes_to_a_file_per_worker_not_the_console(ray_here, tmp_path, capfd):
    ray = ray_here

    @ray.remote
    def shout() -> int:
        import os
        import sys

        print("hello from a task", flush=True)
        print("FutureWarning: something deprecated", file=sys.stderr, flush=True)
        return os.getpid()

    @ray.remote(num_cpus=0)
    class Talker:
        def __init__(self) -> None:
            print("an actor starts", flush=True)

        def pid(self) -> int:
            import os

            return os.getpid()

    folder = tmp_path / "logs"
    with logs_to(str(folder)):
        pid = ray.get(shout.remote())
        talker = Talker.remote()
        actor_pid = ray.get(talker.pid.remote())
        task_file = wait_for(folder, "shout", "hello from a task")
        assert task_file == f"shout-{pid}.log"
        assert "FutureWarning: something deprecated" in (folder / task_file).read_text()
        assert wait_for(folder, "Talker", "an actor starts") == f"Talker-{actor_pid}.log"
    ray.kill(talker)
    console = capfd.readouterr()
    assert "hello from a task" not in console.out + console.err
    assert "an actor starts" not in console.out + console.err


def test_remote_steps_feed_the_drivers_bar_which_ends_with_the_job(ray_here, capsys, monkeypatch):
    ray = ray_here
    monkeypatch.setenv("SONOSYNTH_PROGRESS_INTERVAL_S", "30")

    @ray.remote
    def train(counter, steps: int) -> None:
        reporter = StepReporter(counter, total=steps, done=2)
        for _ in range(2, steps):
            reporter.update(1)
            reporter.set_postfix(loss="0.25")
        reporter.close()

    with remote_progress("train-toy", "step") as counter:
        ray.get(train.remote(counter, 12))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("    train-toy: 12/12 step (100%) in ")
    assert lines[0].endswith("loss=0.25")
    with pytest.raises(ray.exceptions.RayActorError):  # the counter died with its bar
        ray.get(counter.read.remote(), timeout=30)


def test_without_a_bar_no_counter_is_made(ray_here):
    with remote_progress("train-toy", enabled=False) as counter:
        assert counter is None


def test_without_a_logs_folder_ray_output_is_printed_as_ray_prints_it(ray_here, capfd, monkeypatch):
    """A stage run from Python (no ``logs_to``) keeps Ray's usual console output."""
    from sonosynth.infra import console

    ray = ray_here
    monkeypatch.setattr(console._router, "last", None)

    @ray.remote
    def speak() -> None:
        print("a line with nowhere else to go", flush=True)

    ray.get(speak.remote())
    seen, deadline = "", time.monotonic() + 30
    while "a line with nowhere else to go" not in seen and time.monotonic() < deadline:
        time.sleep(0.2)
        captured = capfd.readouterr()
        seen += captured.out + captured.err
    assert "a line with nowhere else to go" in seen
