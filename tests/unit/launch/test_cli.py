"""The `sonosynth` console script, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SONOSYNTH = str(Path(sys.executable).with_name("sonosynth"))


def _run(*args, cwd=None):
    return subprocess.run([SONOSYNTH, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_ingest_real_cohort_then_inspect(shared_data, tmp_path):
    out = tmp_path / "es"
    res = _run("ingest", "--cohort", "fpdb", "--src", str(shared_data / "es_head_sample"), "--out", str(out),
               "--no-progress", "--set", "shards.max_samples=10")
    assert res.returncode == 0, res.stderr
    assert "ingested 24 samples into 3 shards" in res.stdout
    assert (out / "config.yaml").read_text().count("max_samples: 10") == 1
    grid = tmp_path / "grid.png"
    res = _run("inspect", str(out), "--grid", str(grid))
    summary = json.loads(res.stdout)
    assert res.returncode == 0 and summary["samples_read"] == 24 == summary["with_mask"]
    assert grid.stat().st_size > 1000


def test_strict_and_nothing_ingested_exit_codes(tmp_path):
    src = tmp_path / "src" / "image"
    src.mkdir(parents=True)
    (src / "broken.png").write_bytes(b"nope")
    res = _run("ingest", "--cohort", "folder", "--src", str(src.parent), "--out", str(tmp_path / "o"), "--no-progress")
    assert res.returncode == 1 and "nothing was ingested" in res.stderr
    assert "unreadable_image" in (tmp_path / "o" / "quarantine.jsonl").read_text()

    res = _run("ingest", "--cohort", "phantom", "--num-samples", "3", "--out", str(tmp_path / "p"), "--strict",
               "--no-progress")
    assert res.returncode == 0, res.stderr


def test_bad_arguments_explain_the_fix(tmp_path):
    res = _run("ingest", "--cohort", "hc18", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "pass --src DIR" in res.stderr
    res = _run("ingest", "--cohort", "phantom", "--out", str(tmp_path / "o"), "--set", "shards.max_sample=3")
    assert res.returncode == 2 and "did you mean 'max_samples'" in res.stderr
    res = _run("inspect", str(tmp_path / "not-a-dataset"))
    assert res.returncode == 2 and "manifest.parquet is missing" in res.stderr


def test_config_lists_documented_fields_stages_and_recipes():
    res = _run("config", "ingest")
    assert res.returncode == 0 and "shards.max_samples (int, default 256): Samples per shard" in res.stdout
    res = _run("config")
    assert res.returncode == 0 and [line.split()[0] for line in res.stdout.splitlines()] == [
        "ingest", "train-lora", "train-controlnet", "generate", "train-sam", "train-classifier", "quality",
        "evaluate", "promote", "pipeline", "sweep"]
    res = _run("config", "--recipes")
    assert res.returncode == 0 and {"demo", "lora_joint_tiny", "generate_tiny"} <= set(res.stdout.split())
    res = _run("config", "train-sam-typo")
    assert res.returncode == 2 and "stages are ingest, train-lora, train-controlnet, generate, train-sam" in res.stderr


def test_every_stage_verb_takes_the_recipe_first(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\nnot_a_field: 1\n")
    from sonosynth.launch.stages import STAGES

    from typer.testing import CliRunner

    from sonosynth.launch.cli.app import app

    for verb in STAGES:  # in this process: a console script per verb and recipe took 36 s
        res = CliRunner().invoke(app, [verb, str(bad)])
        assert res.exit_code == 2 and "not_a_field: unknown key" in res.stderr, (verb, res.stderr)
        res = CliRunner().invoke(app, [verb, "no_such_recipe"])
        assert res.exit_code == 2 and "no recipe 'no_such_recipe'" in res.stderr, (verb, res.stderr)


def test_demo_rejects_unknown_sections(tmp_path):
    res = _run("demo", "--out", str(tmp_path / "demo"), "--set", "stages.lora.engine.max_step=6")
    assert res.returncode == 2 and "did you mean 'max_steps'" in res.stderr


def test_tracking_replay_names_a_missing_backlog(tmp_path):
    res = _run("tracking-replay", str(tmp_path / "nothing-here"))
    assert res.returncode == 2 and "nothing to replay" in res.stderr
