"""One progress bar per stage, drawn by the driver.

``progress(total, desc, unit)`` is a live bar on a terminal (redrawn in place, gone when the work
is done: the stage's summary follows it) and, on anything else (a log file, ``submit --wait``, CI),
a plain line at most every ``$SONOSYNTH_PROGRESS_INTERVAL_S`` seconds (30) and one at the end:
no carriage returns, no colours.

Work that runs on Ray workers reports its steps to a ``StepCounter`` actor (``remote_progress``);
the driver reads it twice a second into its bar, as Ray Data draws its bars from its executor's
counts. A bar lives as long as its ``with`` block: none outlives its job.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, TypeVar

from sonosynth.infra.console import interactive

T = TypeVar("T")
INTERVAL_ENV = "SONOSYNTH_PROGRESS_INTERVAL_S"
"""Seconds between plain progress lines when the console is not a terminal (default 30)."""


def _rate(done: float, seconds: float, unit: str) -> str:
    if done <= 0 or seconds <= 0:
        return ""
    per_s = done / seconds
    return f", {per_s:.3g} {unit}/s" if per_s >= 1 else f", {seconds / done:.3g} s/{unit}"


class Progress:
    """A bar (``enabled``), or nothing: ``update(n)``, ``set_postfix(**values)``, ``close()``."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 stream: Any = None):
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.stream = stream or sys.stderr
        self.total, self.done, self.start_done = total, initial, initial
        self.postfix: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.bar = None
        self.live = enabled and interactive(self.stream)
        self.interval = float(os.environ.get(INTERVAL_ENV, "30"))
        self.last_line = self.t0
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False,
                            dynamic_ncols=True, mininterval=0.25)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def _line(self, final: bool = False) -> None:
        self.last_line = time.monotonic()
        seconds = self.last_line - self.t0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        when = f" in {seconds:.0f} s" if final else f" after {seconds:.0f} s"
        print(f"    {self.desc}: {self.done}{of} {self.unit}{pct}{when}"
              f"{_rate(self.done - self.start_done, seconds, self.unit)}{extra}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done > self.start_done:
            self._line(final=True)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True) -> Progress:
    return Progress(total, desc, unit, initial=initial, enabled=enabled)


class StepCounter:
    """A Ray actor that counts a remote job's steps for the driver's bar (rank 0 reports to it)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.start = self.done = 0
        self.postfix: dict[str, Any] = {}

    def begin(self, total: int, done: int) -> None:
        """The job's steps, and how many of them were done before it started (a resume)."""
        self.total, self.start, self.done = total, done, done

    def advance(self, n: int, postfix: dict[str, Any] | None = None) -> None:
        self.done += n
        self.postfix.update(postfix or {})

    def read(self) -> tuple[int | None, int, int, dict[str, Any]]:
        return self.total, self.start, self.done, dict(self.postfix)


class StepReporter:
    """A worker's side of ``remote_progress``: sends its steps to the counter, at most every
    ``every_s`` seconds (fire and forget), and what is left on ``close``."""

    def __init__(self, counter: Any, total: int, done: int, every_s: float = 0.5):
        self.counter, self.every_s, self.pending, self.last = counter, every_s, 0, time.monotonic()
        self.postfix: dict[str, Any] = {}
        counter.begin.remote(total, done)

    def update(self, n: int = 1) -> None:
        self.pending += n
        if time.monotonic() - self.last >= self.every_s:
            self._send()

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)

    def _send(self) -> Any:
        ref = self.counter.advance.remote(self.pending, self.postfix)
        self.pending, self.postfix, self.last = 0, {}, time.monotonic()
        return ref

    def close(self) -> None:
        """Sends what is left and waits for it: the driver reads the last count after the job ends."""
        import ray

        try:
            ray.get(self._send(), timeout=10)
        except Exception:  # noqa: BLE001 - a lost count never fails the job
            pass


@contextmanager
def remote_progress(desc: str, unit: str = "step", enabled: bool = True, poll_s: float = 0.5) -> Iterator[Any]:
    """Yields a ``StepCounter`` handle to give the remote job (None when ``enabled`` is false) and
    draws its count in the driver's bar until the block ends; the counter dies with the block."""
    if not enabled:
        yield None
        return
    import ray

    counter = ray.remote(num_cpus=0, max_restarts=0)(StepCounter).remote()
    stop = threading.Event()
    bars: list[Progress] = []  # drawn once the job says how many steps it has

    def follow() -> None:
        while True:
            finishing = stop.is_set()  # one more read after the job ended: its last steps
            try:
                total, start, done, postfix = ray.get(counter.read.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the driver's bar must never end the job
                total = None
            if total is not None:
                if not bars:
                    bars.append(Progress(total, desc, unit, initial=start))
                bar = bars[0]
                if done > bar.done:
                    bar.update(done - bar.done)
                if postfix:
                    bar.set_postfix(**postfix)
            if finishing:
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=follow, name="sonosynth-progress", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join(timeout=15)
        for bar in bars:
            bar.close()
        ray.kill(counter, no_restart=True)


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """``items`` with a bar that counts them and closes when they end."""
    with Progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
