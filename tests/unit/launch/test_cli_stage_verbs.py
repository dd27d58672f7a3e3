"""A stage verb's flags land on its config fields: defaults < recipe < flags < --set."""

from __future__ import annotations

import shlex

from sonosynth.launch.cli.stage_verbs import flag_values
from sonosynth.launch.stages import STAGES

PROMOTE_RECIPE = """\
out: runs/promote
model: sonosynth-sam
evaluation:
  datasets: [runs/hc18]
"""


def test_flags_become_nested_fields_and_unset_flags_are_left_out():
    tree, nulls = flag_values(STAGES["ingest"], {"cohort": "phantom", "num-samples": 5, "strict": False,
                                                 "src": None, "progress": False})
    assert tree == {"cohort": {"name": "phantom", "phantom": {"num": 5}}, "progress": False} and nulls == []
    tree, _ = flag_values(STAGES["train-sam"], {"dataset": "runs/real", "synthetic": "runs/syn", "workers": 2})
    assert tree == {"data": {"sources": {"real": {"dataset": "runs/real"}, "synthetic": {"dataset": "runs/syn"}}},
                    "engine": {"workers": 2}}


def test_split_all_sets_the_split_to_null():
    stage = STAGES["evaluate"]
    given = {"dataset": "runs/hc18", "predictions": "runs/preds"}
    tree, nulls = flag_values(stage, {**given, "split": "all"})
    assert tree == given and nulls == ["split=null"]
    assert stage.resolve(None, tree, nulls).split is None
    assert stage.resolve(None, *flag_values(stage, {**given, "split": "val"})).split == "val"


def test_promote_is_the_stage_from_the_cli_to_a_rendered_job(tmp_path):
    from sonosynth.launch.cluster.k8s_render import render
    from sonosynth.launch.cluster.submit import check_verb

    recipe = tmp_path / "promote_sam.yaml"
    recipe.write_text(PROMOTE_RECIPE)
    stage = STAGES["promote"]
    tree, _ = flag_values(stage, {"version": "7", "tracking-uri": "http://mlflow:5000"})
    cfg = stage.resolve(str(recipe), tree, ["rules.margin=0.01"])
    assert (cfg.model, cfg.version, cfg.tracking.uri, cfg.rules.margin) == \
        ("sonosynth-sam", "7", "http://mlflow:5000", 0.01)
    check_verb(["promote", str(recipe)])
    (job,), _ = render(str(recipe), "promote", ["version=7"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("promote"):] == ["promote", "promote_sam.yaml", "--set", "version=7"]


def test_the_pipeline_resolves_its_sections_with_its_own_rules(tmp_path):
    stage = STAGES["pipeline"]
    tree, _ = flag_values(stage, {"from": "lora", "tracking-uri": "sqlite:///x.db", "out": str(tmp_path)})
    cfg = stage.resolve("demo", tree, ["lora.engine.max_steps=3"])
    assert cfg.from_stage == "lora" and cfg.tracking.uri == "sqlite:///x.db" and cfg.out == str(tmp_path)
    assert cfg.stages["lora"]["engine"]["max_steps"] == 3


def _stage_that_logs(outcome: str):
    """The evaluate stage's entry with a run that logs as Ray would, then delivers or fails."""
    import dataclasses
    import logging

    from sonosynth.infra.stage import Report, StageFailed

    real = STAGES["evaluate"]

    def run(cfg):
        logging.getLogger("ray.train").warning("Ray Train says hello")
        if outcome == "fail":
            raise StageFailed("the predictions are gone")
        return Report(stage="evaluate", out=cfg.out, text="scored 3 images")

    return dataclasses.replace(real, load=lambda: (real.config_class, run))


def test_a_stage_verb_prints_its_logs_folder_and_keeps_libraries_off_the_console(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from sonosynth.launch.cli.stage_verbs import stage_command

    monkeypatch.delenv("SONOSYNTH_VERBOSE", raising=False)
    for outcome, code in (("deliver", 0), ("fail", 1)):
        app = typer.Typer()
        app.command("evaluate")(stage_command(_stage_that_logs(outcome)))
        out = tmp_path / outcome
        result = CliRunner().invoke(app, ["--dataset", "d", "--predictions", "p", "--out", str(out)])
        assert result.exit_code == code, result.output
        assert f"logs: {out}/logs" in result.output and "Ray Train says hello" not in result.output
        assert "Ray Train says hello" in (out / "logs" / "driver.log").read_text()
