"""The sweep runner on a small real stage (in this process): grid, seeds, overrides, resume, failures,
and the interval tables and plot read back from a real MLflow store."""

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
from sonosynth.launch.sweep.cells import cell_config
from sonosynth.launch.sweep.config import RunSpec, SweepConfig
from sonosynth.launch.sweep.runner import run


class ScaleConfig(Config):
    out: str
    """Output."""
    a: float = 1.0
    """A factor."""
    b: int = 1
    """Another."""
    seed: int = 0
    """Adds seed / 10 to the score (a seed's share, the same in every arm)."""
    tracking: TrackingConfig = TrackingConfig()
    """Tracking."""


RUNS: list[str] = []


def run_scale(cfg: ScaleConfig) -> Report:
    """Logs score = a * b + seed / 10 to MLflow; fails when b is negative; a finished run is skipped."""
    storage = open_storage(cfg.out)
    claim_output(storage, stage="scale", identity={"a": cfg.a, "b": cfg.b, "seed": cfg.seed},
                 config_yaml=cfg.to_yaml())
    if cfg.b < 0:
        raise StageFailed("b must not be negative")
    if storage.exists("done.json"):
        return Report(stage="scale", out=cfg.out, tracking=json.loads(storage.get_text("done.json")))
    tracker = Tracker(cfg.tracking, experiment="scale-test")
    tracker.start()
    tracker.log_metrics({"score": cfg.a * cfg.b + cfg.seed / 10}, 1)
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
    return build(SweepConfig, data)


def read_csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_grid_runs_every_cell_and_reads_the_table_back_from_mlflow(tmp_path, scale_stage):
    cfg = sweep_cfg(tmp_path, scale_stage, exclude=[{"a": 3, "b": "ten"}], metrics=["train:score"])
    report = run(cfg)
    assert report.failed is None and len(RUNS) == 3
    rows = read_csv(tmp_path / "sw" / "results.csv")
    assert [(r["a"], r["b"], float(r["train:score"]), r["train:score:lo"]) for r in rows] == [
        ("0.5", "one", 0.5, ""), ("0.5", "ten", 5.0, ""), ("3", "one", 3.0, "")]
    assert "| 0.5 | ten | 5.000 — |" in (tmp_path / "sw" / "results.md").read_text()
    assert (tmp_path / "sw" / "a-3__b-one" / "config.yaml").is_file()
    assert (tmp_path / "sw" / "train_score_vs_a.png").read_bytes()[:4] == b"\x89PNG"

    RUNS.clear()
    again = run(cfg)  # finished runs are the stage's to skip; the tables are the same
    assert RUNS == [] and again.text == report.text


def test_seeds_give_intervals_and_paired_differences_from_mlflow(tmp_path, scale_stage):
    cfg = sweep_cfg(tmp_path, scale_stage, grid={"b": {"1": {"b": 1}, "4": {"b": 4}},
                                                  "arm": {"base": {}, "double": {"a": 4.0}}},
                    seeds=[0, 1, 2], seed_keys=["seed"], baseline={"arm": "base"}, metrics=["train:score"])
    assert [s.name for s in cfg.runs()][:2] == ["b-1__arm-base__seed-0", "b-1__arm-double__seed-0"]
    report = run(cfg)
    assert report.failed is None and len(RUNS) == 12
    runs = read_csv(tmp_path / "sw" / "runs.csv")
    assert {(r["b"], r["arm"], r["seed"]): float(r["train:score"]) for r in runs}[("4", "double", "2")] == 16.2
    cells = {(r["b"], r["arm"]): r for r in read_csv(tmp_path / "sw" / "results.csv")}
    base = cells[("1", "base")]  # 2.0, 2.1, 2.2: mean 2.1, sd 0.1, t(0.975, 2) = 4.303
    assert float(base["train:score"]) == pytest.approx(2.1)
    assert float(base["train:score:hi"]) - 2.1 == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    diffs = {(r["b"], r["arm"]): r for r in read_csv(tmp_path / "sw" / "differences.csv")}
    assert set(diffs) == {("1", "double"), ("4", "double")}
    paired = diffs[("4", "double")]  # the seed's share cancels: 16 - 8 at every seed, a zero-width interval
    assert float(paired["train:score"]) == pytest.approx(8.0)
    assert float(paired["train:score:hi"]) - float(paired["train:score:lo"]) == pytest.approx(0, abs=1e-9)
    text = (tmp_path / "sw" / "results.md").read_text()
    assert "Paired differences against arm=base" in text and "+8.000" in text and "(3/3 > 0)" in text
    assert "train_score_vs_b.png" in text

    from mlflow import MlflowClient  # the tables are logged to the sweep's one run, found again on a rerun
    run_id = report.tracking["run_id"]
    names = {a.path for a in MlflowClient(cfg.tracking.uri).list_artifacts(run_id)}
    assert {"results.md", "differences.csv", "train_score_vs_b.png"} <= names
    assert run(cfg).tracking["run_id"] == run_id


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path, scale_stage):
    cfg = sweep_cfg(tmp_path, scale_stage, grid={"b": {"ok": {"b": 2}, "bad": {"b": -1}}})
    report = run(cfg)
    assert len(RUNS) == 1 and "b-bad" in report.failed and "run the sweep again" in report.failed
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert summary["failed"] == {"b-bad": "b must not be negative"}


def test_bad_sweeps_are_refused_with_the_fix(tmp_path, scale_stage):
    with pytest.raises(ConfigError, match="exclude names axes"):
        sweep_cfg(tmp_path, scale_stage, exclude=[{"c": 1}])
    with pytest.raises(ConfigError, match="at least one axis"):
        sweep_cfg(tmp_path, scale_stage, grid={})
    with pytest.raises(ConfigError, match="baseline b=two is not in the grid"):
        sweep_cfg(tmp_path, scale_stage, baseline={"b": "two"})
    with pytest.raises(ConfigError, match="needs its run's prefix"):
        sweep_cfg(tmp_path, scale_stage, metrics=["dice"])
    with pytest.raises(ConfigError, match="repeat a seed"):
        sweep_cfg(tmp_path, scale_stage, seeds=[1, 1])
    cfg = sweep_cfg(tmp_path, scale_stage, grid={"b": {"x": {"c": 1}}})
    with pytest.raises(ConfigError, match="c: unknown key"):
        cell_config(cfg, {"b": "x"}, ScaleConfig)
    cfg = sweep_cfg(tmp_path, scale_stage, grid={"b": {"x": {"out": "${prepare.data.out}/x"}}})
    with pytest.raises(ConfigError, match="no prepare pipeline"):
        cell_config(cfg, RunSpec({"b": "x"}, None), ScaleConfig)


def test_parallel_sizes_from_the_cluster():
    from sonosynth.launch.sweep.parallel import fit_parallel

    assert fit_parallel({"CPU": 16.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}, runs=27) == 2
    assert fit_parallel({"CPU": 2.0}, {"CPU": 4.0}, runs=27) == 1
    assert fit_parallel({"CPU": 64.0}, {"CPU": 1.0}, runs=3) == 3


def test_prepare_references_are_filled_from_the_pipelines_sections(tmp_path, scale_stage):
    from sonosynth.launch.sweep.cells import with_prepared

    cfg = sweep_cfg(tmp_path, scale_stage, prepare="value_tiny_data", seed_keys=["seed"],
                    grid={"b": {"x": {"out": "${prepare.data.out}"}}},
                    evaluate={"dataset": "${prepare.data.outputs.dataset}"})
    with pytest.raises(ConfigError, match="known once the prepare pipeline value_tiny_data ran"):
        cell_config(cfg, RunSpec({"b": "x"}, 0), ScaleConfig)
    sections = {"data": {"out": "/d/data/k1", "outputs": {"dataset": "/d/data/k1/"}}}
    filled = with_prepared(cfg, sections)
    assert filled.grid["b"]["x"]["out"] == "/d/data/k1" and filled.evaluate.dataset == "/d/data/k1/"
    built = cell_config(filled, RunSpec({"b": "x"}, 0), ScaleConfig)
    assert built.out == f"{cfg.out}/b-x__seed-0" and built.tracking.run_name == "b-x__seed-0"
    with pytest.raises(ConfigError, match="has no section 'heads'; its sections: data"):
        with_prepared(sweep_cfg(tmp_path, scale_stage, prepare="p", grid={"b": {"x": {"a": "${prepare.heads.out}"}}}),
                      sections)


def test_value_tiny_builds_every_run_with_the_same_real_heads_in_every_arm_of_a_seed():
    from sonosynth.launch.recipes import find_recipe, load_recipe
    from sonosynth.launch.sweep.cells import with_prepared
    from sonosynth.trainers.sam.train import SamTrainConfig

    sweep = build(SweepConfig, load_recipe(find_recipe("value_tiny")))
    assert sweep.prepare == "value_tiny_data" and sweep.x_axis == "n_real" and len(sweep.runs()) == 27
    sweep = with_prepared(sweep, {"heads": {"out": "/p/heads/k"}, "synthetic": {"out": "/p/synthetic/k"}})
    built = {s.name: cell_config(sweep, s, SamTrainConfig) for s in sweep.runs()}
    one = built["n_real-8__arm-synthetic__seed-2"]
    assert (one.data.seed, one.engine.seed, one.data.sources["real"].count) == (2, 2, 8)
    assert one.data.sources["synthetic"].dataset == "/p/synthetic/k" and one.tracking.registered_model == ""
    weak = built["n_real-8__arm-weak__seed-2"]  # the same real heads as the other arms of seed 2
    assert weak.data.sources["real"] == one.data.sources["real"] and weak.data.augment.preset == "weak"
    assert "synthetic" not in built["n_real-4__arm-real__seed-0"].data.sources
    assert sweep.evaluate.dataset == "/p/heads/k" and sweep.evaluate.split == "test"
