"""The sweep runner on a small real stage: grid, overrides, resume, failures, table from MLflow."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from sonosynth.infra.config import Config, ConfigError, build
from sonosynth.infra.jobdir import claim_output
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import open_storage
from sonosynth.infra.tracking import Tracker, TrackingConfig
from sonosynth.launch import stages
from sonosynth.launch.pipeline import sweep


class ScaleConfig(Config):
    out: str
    """Output."""
    a: float = 1.0
    """A factor."""
    b: int = 1
    """Another."""
    tracking: TrackingConfig = TrackingConfig()
    """Tracking."""


RUNS: list[str] = []


def run_scale(cfg: ScaleConfig) -> Report:
    """Logs score = a * b to MLflow; fails when b is negative; a finished cell is skipped."""
    storage = open_storage(cfg.out)
    claim_output(storage, stage="scale", identity={"a": cfg.a, "b": cfg.b}, config_yaml=cfg.to_yaml())
    if cfg.b < 0:
        raise StageFailed("b must not be negative")
    if storage.exists("done.json"):
        return Report(stage="scale", out=cfg.out, tracking=json.loads(storage.get_text("done.json")))
    tracker = Tracker(cfg.tracking, experiment="scale-test")
    tracker.start()
    tracker.log_metrics({"score": cfg.a * cfg.b}, 1)
    tracker.close()
    RUNS.append(cfg.out)
    done = {"run_id": tracker.run_id, "uri": tracker.uri}
    storage.put_text("done.json", json.dumps(done))
    return Report(stage="scale", out=cfg.out, tracking=done, outputs={"model": cfg.out})


@pytest.fixture
def scale_stage(monkeypatch, tmp_path):
    monkeypatch.setitem(stages.STAGES, "scale", stages.Stage("scale", "test", lambda: (ScaleConfig, run_scale)))
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump({"a": 2.0}))
    RUNS.clear()
    return recipe


def sweep_cfg(tmp_path, recipe, **extra):
    data = {"stage": "scale", "recipe": str(recipe), "out": str(tmp_path / "sw"),
            "grid": {"a": {0.5: {"a": 0.5}, 3: {"a": 3.0}}, "b": {"one": {"b": 1}, "ten": {"b": 10}}},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, **extra}
    return build(sweep.SweepConfig, data)


def test_grid_runs_every_cell_and_reads_the_table_back_from_mlflow(tmp_path, scale_stage):
    cfg = sweep_cfg(tmp_path, scale_stage, exclude=[{"a": 3, "b": "ten"}])
    report = sweep.run(cfg)
    assert report.failed is None and len(RUNS) == 3
    rows = list(csv.DictReader(io.StringIO((tmp_path / "sw" / "results.csv").read_text())))
    assert [(r["a"], r["b"], float(r["train:score"])) for r in rows] == [
        ("0.5", "one", 0.5), ("0.5", "ten", 5.0), ("3", "one", 3.0)]
    assert "| 0.5 | ten | 5.0000 |" in (tmp_path / "sw" / "results.md").read_text()
    assert (tmp_path / "sw" / "a-3__b-one" / "config.yaml").is_file()

    RUNS.clear()
    again = sweep.run(cfg)  # finished cells are the stage's to skip; the table is the same
    assert RUNS == [] and again.text == report.text


def test_a_failing_cell_is_reported_and_the_others_still_run(tmp_path, scale_stage):
    cfg = sweep_cfg(tmp_path, scale_stage, grid={"b": {"ok": {"b": 2}, "bad": {"b": -1}}})
    report = sweep.run(cfg)
    assert len(RUNS) == 1 and "b-bad" in report.failed and "re-run to resume" in report.failed
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert summary["failed"] == {"b-bad": "b must not be negative"}


def test_bad_sweeps_are_refused_with_the_fix(tmp_path, scale_stage):
    with pytest.raises(ConfigError, match="exclude names axes"):
        sweep_cfg(tmp_path, scale_stage, exclude=[{"c": 1}])
    with pytest.raises(ConfigError, match="at least one axis"):
        sweep_cfg(tmp_path, scale_stage, grid={})
    cfg = sweep_cfg(tmp_path, scale_stage, grid={"b": {"x": {"c": 1}}})
    with pytest.raises(ConfigError, match="c: unknown key"):
        sweep.cell_config(cfg, {"b": "x"}, ScaleConfig)
