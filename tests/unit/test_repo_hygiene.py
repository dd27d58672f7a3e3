"""What git tracks: sources, recipes, docs and small fixtures; never run outputs, stores or wheels."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_BYTES = 1 << 20
GENERATED = (".db", ".whl", ".sqlite", ".tar", ".parquet", ".pth", ".safetensors", ".ckpt", ".pyc")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.decode().split("\0") if p]


def test_no_tracked_file_over_1_mb_outside_test_fixtures():
    big = [(p, (REPO / p).stat().st_size) for p in _tracked()
           if (REPO / p).is_file() and (REPO / p).stat().st_size > MAX_BYTES
           and not p.startswith("tests/fixtures/")]
    assert not big, (f"tracked files over 1 MB: {big}; remove them with `git rm --cached` and add an "
                     f"ignore rule (only tests/fixtures/ may hold large files a test needs)")


def test_no_run_outputs_stores_or_wheels_are_tracked():
    bad = [p for p in _tracked() if p.endswith(GENERATED) and not p.startswith("tests/fixtures/")
           or p.startswith(("runs/", "mlruns/", "mlartifacts/", ".venv/"))]
    assert not bad, f"generated files are tracked: {bad}; `git rm --cached` them (.gitignore covers them)"


def test_gitignore_covers_what_jobs_write(tmp_path):
    probes = ["runs/demo/mlflow.db", "mlflow.db", "mlruns/0/meta.yaml", "x/tracking-offline/a.jsonl",
              "ruff-0.17.6-py3-none-any.whl", ".venv/bin/python"]
    res = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=REPO, capture_output=True, text=True)
    assert sorted(res.stdout.split()) == sorted(probes), res.stdout
