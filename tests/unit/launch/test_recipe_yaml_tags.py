"""Recipes are read with a safe loader: a YAML tag is refused, naming the file and line, and never run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sonosynth.datasets.ingest import IngestConfig
from sonosynth.infra.config import ConfigError
from sonosynth.launch.recipes import resolve


def recipe(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("tag, value", [
    ("!!python/object/apply:os.system", '!!python/object/apply:os.system ["touch {marker}"]'),
    ("!!python/name:os.system", "!!python/name:os.system"),
    ("!custom", "!custom phantom"),
    ("!!str", "!!str phantom"),
])
def test_a_tag_is_refused_naming_the_file_and_line(tmp_path, tag, value):
    marker = tmp_path / "ran"
    path = recipe(tmp_path, "evil.yaml", f"out: runs/x\ncohort:\n  name: {value.format(marker=marker)}\n")
    with pytest.raises(ConfigError) as err:
        resolve(IngestConfig, str(path), {}, [])
    assert str(err.value) == (f"recipe {path}, line 3: the YAML tag {tag} is not allowed; a recipe holds plain "
                              "values (strings, numbers, booleans, lists, mappings): remove the tag")
    assert not marker.exists()


def test_a_tag_in_an_extended_recipe_names_that_file(tmp_path):
    base = recipe(tmp_path, "base.yaml", "cohort: !!python/object/new:dict {}\n")
    child = recipe(tmp_path, "child.yaml", "extends: base.yaml\nout: runs/x\n")
    with pytest.raises(ConfigError, match=rf"recipe {base}, line 1: the YAML tag !!python/object/new:dict"):
        resolve(IngestConfig, str(child), {}, [])


def test_an_exclamation_mark_in_a_value_is_not_a_tag(tmp_path):
    path = recipe(tmp_path, "ok.yaml", "out: 'runs/!x'\ncohort:\n  name: phantom  # !not a tag\n")
    assert resolve(IngestConfig, str(path), {}, []).out == "runs/!x"


def test_the_cli_prints_one_line_and_exits_2_with_no_traceback(tmp_path):
    marker = tmp_path / "pwned"
    path = recipe(tmp_path, "evil.yaml",
                  f'out: {tmp_path}/out\ncohort: !!python/object/apply:os.system ["touch {marker}"]\n')
    cli = Path(sys.executable).with_name("sonosynth")
    res = subprocess.run([str(cli), "ingest", str(path)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: recipe {path}, line 2: the YAML tag !!python/object/apply:os.system is not allowed; a recipe holds "
        "plain values (strings, numbers, booleans, lists, mappings): remove the tag"]
    assert "Traceback" not in res.stderr + res.stdout and not marker.exists() and not (tmp_path / "out").exists()
