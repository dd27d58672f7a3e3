"""A stage in a real 80-column terminal (a pseudo-terminal): sonosynth's lines and one bar, nothing else.

generate is the cheapest stage that starts Ray and actors on several workers, the source of the
console noise this guards against (Ray's prefixed worker lines, core_worker errors, tqdm bars of
worker processes redrawn after the job).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
SONOSYNTH = str(Path(sys.executable).with_name("sonosynth"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOISE = ("(pid=", "RayTrainWorker", "SamplerWorker", "core_worker", "FutureWarning", "Token authentication",
         "ERROR", "Traceback", "DeepSpeed")


def run_in_terminal(args: list[str], cwd: Path, env: dict[str, str], columns: int = 80,
                    timeout: float = 300) -> tuple[int, str]:
    """``sonosynth ARGS`` with stdin, stdout and stderr on a pseudo-terminal of ``columns``: (status, output)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([SONOSYNTH, *args], cwd=cwd, env={**env, "COLUMNS": str(columns), "TERM": "xterm"},
                            stdin=follower, stdout=follower, stderr=follower, start_new_session=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: every process on it is gone
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    status = proc.wait(timeout=30)
    return status, b"".join(chunks).decode("utf-8", errors="replace")


def test_generate_in_an_80_column_terminal_shows_only_sonosynth_lines_and_one_bar(tmp_path, tiny_lora, procs):
    out = tmp_path / "synthetic"
    status, output = run_in_terminal(
        ["generate", "generate_tiny", "--out", str(out), "--lora", str(tiny_lora), "--num-samples", "8",
         "--workers", "2", "--set", "shard_size=2", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"],
        cwd=tmp_path, env=procs.env())
    assert status == 0, output[-3000:]
    for noise in NOISE:
        assert noise not in output, f"{noise!r} on the terminal:\n{output[-3000:]}"
    assert "\x1b[A" not in output  # no bar of another position (worker bars) moved the cursor
    drawn = [ANSI.sub("", piece) for piece in re.split(r"[\r\n]", output)]
    bars = [piece for piece in drawn if "%|" in piece or "it/s]" in piece]
    assert bars and all(piece.startswith("generate:") and "sample" in piece for piece in bars), bars
    assert all(len(piece) <= 80 for piece in bars), max(bars, key=len)  # redrawn in place, never wrapped
    # a line as it stays on the screen: what follows its last carriage return (a cleared bar before it)
    lines = [ANSI.sub("", piece).split("\r")[-1] for piece in output.replace("\r\n", "\n").split("\n")]
    lines = [line for line in lines if line.strip()]
    assert lines[-1].strip() == f"logs: {out}/logs", lines[-4:]  # nothing after the summary
    assert any(line.startswith("generated 8/8 samples") for line in lines)
    assert "Started a local Ray instance" in (out / "logs" / "driver.log").read_text()
