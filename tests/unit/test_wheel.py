"""The built wheel is what a Ray cluster and the image install: it must work away from the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a clean copy: no build/ or egg-info left in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
         cwd=out)
    return next(out.glob("sonosynth-*.whl"))


def test_wheel_holds_every_package_and_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert recipes and all(f"sonosynth/configs/{r}" in names for r in recipes)
    for pkg in ("datasets", "datasets/cohorts", "trainers", "trainers/diffusion", "launch", "infra"):
        assert f"sonosynth/{pkg}/__init__.py" in names, pkg
    assert not any(n.startswith(("tests/", "datasets/", "configs/")) for n in names), "stray top-level folders"


def test_wheel_installed_in_a_fresh_venv_finds_its_recipes_and_configs(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp_path).stdout.strip())
    # The dependencies come from the test venv as a plain path entry: its .pth files (the
    # editable sonosynth among them) are not processed, so only the wheel provides sonosynth.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([str(py), "-c", "import sonosynth, sonosynth.launch.recipes as r; "
                  "print(sonosynth.__file__); print(r.find_recipe('demo'))"], cwd=tmp_path, env=env).stdout
    assert str(site) in where.split("\n")[0] and str(REPO) not in where, where
    assert where.split("\n")[1].startswith(str(site)) and where.split("\n")[1].endswith("demo.yaml")
    cli = str(venv / "bin" / "sonosynth")
    assert "shards.max_samples" in _run([cli, "config", "ingest"], cwd=tmp_path, env=env).stdout
    assert "lora_joint_tiny" in _run([cli, "config", "--recipes"], cwd=tmp_path, env=env).stdout
