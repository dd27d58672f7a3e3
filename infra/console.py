"""What a person sees: sonosynth's own lines on the console, everything else in the job's log files.

A stage runs inside ``logs_to(folder)``: the driver's library logging (Ray, DeepSpeed, MLflow, Python
warnings) goes to ``folder/driver.log`` and every Ray worker's and actor's output, which Ray forwards
to the driver, to ``folder/<actor or task>-<pid>.log``. The console keeps sonosynth's own warnings
and errors, the stage lines and one progress bar (``infra/progress.py``). ``--verbose`` (or
``$SONOSYNTH_VERBOSE=1``) also prints all of it on the console, as Ray prints it.

Ray's output is taken where Ray's driver prints it (``ray._private.worker.print_worker_logs``, the
one function every forwarded line, Ray's own error messages and the lines flushed at shutdown pass
through), so nothing a worker prints reaches the console after a stage's summary unless asked for.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sonosynth.infra.secrets import redact

VERBOSE_ENV = "SONOSYNTH_VERBOSE"
"""1: print Ray's, DeepSpeed's and the workers' output on the console too (``--verbose``)."""
DRIVER_LOG = "driver.log"
LIBRARY_LOGGERS = ("ray", "mlflow", "DeepSpeed", "deepspeed", "alembic", "torch", "urllib3", "botocore",
                   "boto3", "s3transfer", "filelock", "httpx", "transformers", "diffusers", "py.warnings")
"""Loggers that install their own console handlers; their records are sent to the log files instead."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def set_verbose(on: bool = True) -> None:
    """Also the environment: a job started from here (a Ray task, a submitted job) inherits it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def interactive(stream: Any = None) -> bool:
    """Whether ``stream`` (stderr) is a terminal that redraws a bar in place."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


class LogFolder:
    """One log folder, opened lazily: a job that is refused before it logs leaves no folder behind.
    A remote folder (s3://) is written here and uploaded when the stage ends."""

    def __init__(self, where: str, storage_config: Any = None):
        self.where, self.storage_config = where.rstrip("/"), storage_config
        self.remote = "://" in self.where
        self.local = Path(tempfile.mkdtemp(prefix="sonosynth-logs-")) if self.remote else Path(self.where)
        self.files: dict[str, Any] = {}
        self.written: set[str] = set()
        """The files written so far (none: the folder was never made)."""

    def write(self, name: str, text: str) -> None:
        f = self.files.get(name)
        if f is None:
            self.local.mkdir(parents=True, exist_ok=True)
            f = self.files[name] = open(self.local / name, "a", encoding="utf-8", errors="replace")
            self.written.add(name)
        f.write(text)
        f.flush()

    def close(self) -> None:
        """Closes the files; a remote folder's are uploaded, or kept here with a warning when the
        store refuses them (logs never fail a stage, nor hide why it failed)."""
        for f in self.files.values():
            f.close()
        kept = False
        if self.remote and self.files:
            from sonosynth.infra.storage import open_storage

            try:
                storage = open_storage(self.where, self.storage_config)
                for name in self.files:
                    storage.put_file(name, self.local / name)
            except Exception as err:  # noqa: BLE001
                kept = True
                logging.getLogger(__name__).warning("could not upload the logs to %s (%s); they are kept in %s",
                                                    self.where, err, self.local)
        if self.remote and not kept:
            shutil.rmtree(self.local, ignore_errors=True)
        self.files = {}


class _Router:
    """Where log text goes now: the innermost ``logs_to`` folder, else the last one (a worker's
    lines can arrive after its stage ended), else nowhere."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stack: list[LogFolder] = []
        self.last: LogFolder | None = None

    def write(self, name: str, text: str) -> bool:
        """False when no stage ran here under ``logs_to``. A line that arrives after its stage ended
        goes to that stage's folder, or, when that folder was uploaded already, nowhere."""
        with self.lock:
            folder = self.stack[-1] if self.stack else self.last
            if folder is None:
                return False
            if self.stack or not folder.remote:
                folder.write(name, text)
            return True


_router = _Router()


class _DriverLogHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _router.write(DRIVER_LOG, redact(self.format(record)) + "\n")
        except Exception:  # noqa: BLE001 - logging must never end the job
            self.handleError(record)


def _for_the_console(record: logging.LogRecord) -> bool:
    return verbose() or (record.name.startswith("sonosynth") and record.levelno >= logging.WARNING)


class _ConsoleHandler(logging.StreamHandler):
    """sonosynth's warnings and errors (everything at INFO with --verbose), written around a live bar."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.addFilter(_for_the_console)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def configure() -> None:
    """The command line's logging: the console for people, the log files for the rest. Idempotent."""
    root = logging.getLogger()
    if any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        return
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a second bar, MLflow's own
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # else its import gives it a console handler
    root.setLevel(logging.INFO)
    root.addHandler(_ConsoleHandler())
    root.addHandler(_DriverLogHandler())
    logging.captureWarnings(True)
    tame_libraries()


def tame_libraries() -> None:
    """Send the records of libraries that print for themselves through the root logger instead
    (call it again after importing one: MLflow, Ray and DeepSpeed add their handlers on import)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def _worker_file(data: dict[str, Any]) -> str:
    name, pid = data.get("actor_name") or data.get("task_name"), str(data.get("pid", ""))
    if not name and not pid.isdigit():  # Ray's own processes: pid is "autoscaler", "raylet", ...
        return f"{_NAME.sub('_', pid or 'ray')[:60]}.log"
    return f"{_NAME.sub('_', str(name or 'worker'))[:60]}-{_NAME.sub('_', pid)}.log"


_ray_printer = None


def route_ray_output() -> None:
    """Ray's forwarded worker output to the log files (and, with --verbose, to the console too).
    Output that has no folder to go to (a stage run from Python, without ``logs_to``) is printed as
    Ray prints it. Ray's printing thread looks the printer up on every batch: any time will do."""
    global _ray_printer
    import ray._private.worker as ray_worker

    if _ray_printer is not None:
        return
    _ray_printer = ray_worker.print_worker_logs

    def print_worker_logs(data: dict[str, Any], print_file: Any, *args: Any, **kwargs: Any) -> None:
        lines = [line for line in data.get("lines", []) if line]
        filed = bool(lines) and _router.write(_worker_file(data), redact("\n".join(lines)) + "\n")
        if verbose() or (lines and not filed):  # Python code that runs a stage without logs_to sees Ray's output
            _ray_printer(data, print_file, *args, **kwargs)

    ray_worker.print_worker_logs = print_worker_logs


@contextmanager
def logs_to(where: str, storage_config: Any = None) -> Iterator[LogFolder]:
    """Everything but sonosynth's console lines goes to ``where`` (a folder or s3:// prefix) while
    the block runs; yields the folder (``.written`` tells whether anything went there)."""
    configure()
    tame_libraries()
    folder = LogFolder(where, storage_config)
    with _router.lock:
        _router.stack.append(folder)
    try:
        yield folder
    finally:
        with _router.lock:
            _router.stack.remove(folder)
            _router.last = folder  # a local folder reopens for a line that arrives late
            folder.close()
