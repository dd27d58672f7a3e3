"""The folder mapping and its guards (DESIGN.md, Layout)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_plain_import_datasets_from_repo_root_gets_the_installed_package(tmp_path):
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("IS_HF = True\n")
    (fake / "arrow_dataset.py").write_text("X = 1\n")
    res = _run("import datasets, datasets.arrow_dataset as a; print(datasets.IS_HF, a.X, datasets.__file__)",
               pythonpath=str(tmp_path / "site"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:2] == ["True", "1"]
    assert str(tmp_path) in res.stdout


def test_plain_import_datasets_without_hf_refuses_with_the_fix():
    res = _run("import datasets")
    assert res.returncode != 0
    assert "sonosynth.datasets" in res.stderr and "ImportError" in res.stderr


def test_datasets_folder_refuses_another_dotted_name():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('other.datasets', r'{REPO / 'datasets' / '__init__.py'}')\n"
        "m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
    )
    res = _run(code)
    assert res.returncode != 0 and "imported as 'other.datasets'" in res.stderr


def test_sonosynth_datasets_imports_from_the_repo_folder():
    import sonosynth.datasets as ds

    assert Path(ds.__file__).resolve() == (REPO / "datasets" / "__init__.py").resolve()


def test_every_subpackage_folder_is_declared_in_pyproject():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    found = set()
    for pkg, folder in cfg["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((pkg, *rel)))
    assert found <= declared, f"add to [tool.setuptools] packages: {sorted(found - declared)}"


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("sonosynth")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ingest" in res.stdout
