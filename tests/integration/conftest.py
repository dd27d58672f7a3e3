"""What the integration tests do with processes, written once: run the CLI, kill a job with
everything it started, wait for a job to reach a point (a checkpoint, a finished shard)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

SONOSYNTH = str(Path(sys.executable).with_name("sonosynth"))


class Procs:
    """``procs`` in a test: the helpers below, bound to nothing but the interpreter's sonosynth."""

    sonosynth = SONOSYNTH

    @staticmethod
    def env(*drop: str, **extra: str) -> dict[str, str]:
        """This process's environment without a Ray address or MLflow store of its own (and ``drop``),
        so a job starts its own local Ray and uses the store its config names."""
        gone = {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", *drop}
        return {**{k: v for k, v in os.environ.items() if k not in gone}, **extra}

    def cli(self, args: list[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None,
            timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
        """``sonosynth ARGS``; with ``check``, a non-zero exit fails the test with the output's tail."""
        proc = subprocess.run([SONOSYNTH, *args], cwd=cwd, env=env if env is not None else self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, (f"sonosynth {' '.join(args)} -> {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                                          f"{proc.stderr[-6000:]}")
        return proc

    def start(self, args: list[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None,
              **popen) -> subprocess.Popen:
        """``sonosynth ARGS`` in the background, in a process group of its own (for ``kill_tree``)."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen([SONOSYNTH, *args], cwd=cwd, env=env if env is not None else self.env(),
                                text=True, start_new_session=True, **popen)

    @staticmethod
    def kill_tree(proc: subprocess.Popen) -> None:
        """SIGKILL a job, its local Ray and its workers at once (Ray actors run in process groups of
        their own and would go on for a second or two after the driver)."""
        import psutil

        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            child.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    @staticmethod
    def wait_until(done: Callable[[], bool], proc: subprocess.Popen | None = None, *, timeout: float = 600,
                   what: str = "the job") -> None:
        """Poll ``done`` until it holds; fail if ``proc`` exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not done():
            if proc is not None and proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"{what} ended (exit {proc.returncode}) before it was caught:\n"
                            f"{(out or '')[-3000:]}\n{(err or '')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not get there in {timeout:.0f} s")
            time.sleep(0.2)

    @staticmethod
    def checkpoint(out: Path, step: int) -> Path:
        """The marker a training job writes when its checkpoint of ``step`` is complete."""
        return Path(out) / "checkpoints" / f"step-{step:08d}" / "_COMPLETE.json"


@pytest.fixture(scope="session")
def procs() -> Procs:
    return Procs()


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory) -> Path:
    """A joint-mode LoRA in the exact format train-lora writes (random adapters, no training)."""
    from sonosynth.trainers.diffusion.lora import write_random_lora
    from sonosynth.trainers.diffusion.models import DiffusionModelConfig

    return write_random_lora(tmp_path_factory.mktemp("tiny-lora") / "lora", DiffusionModelConfig(), rank=4,
                             resolution=64)


def _fingerprint(uri, storage=None) -> dict[str, str]:
    from sonosynth.datasets.reader import DatasetReader

    out: dict[str, str] = {}
    for s in DatasetReader(str(uri), storage=storage, distributed=False).samples():
        assert s.key not in out, f"duplicate key {s.key}"
        out[s.key] = hashlib.sha256(s.image.tobytes() + s.mask.tobytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def fingerprint():
    """``fingerprint(dataset, storage=None)``: sample key -> sha256 of its image and mask bytes, read back
    through the project's reader (a key seen twice fails the test)."""
    return _fingerprint


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium on a served folder (``browser.py`` beside this file): ``browser.check(folder, page,
    ids)``. Debian's chromium is installed once with apt-get when missing and we are root; else a skip."""
    spec = importlib.util.spec_from_file_location("sonosynth_test_browser", Path(__file__).with_name("browser.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the tests are imported with --import-mode=importlib: no sys.path entry
    chromium, why = module.find_chromium()
    if chromium is None:
        pytest.skip(why)
    return module.Browser(chromium)
