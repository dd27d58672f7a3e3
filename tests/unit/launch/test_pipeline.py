"""The pipeline on two instant stages: keys and wiring, skipping, re-runs, failures, offline tracking.

The real stages run end to end in tests/integration/test_pipeline.py; here two small stages
(registered for the test) keep every case to a few seconds: ``toy-source`` has no tracking of
its own (the pipeline records its run), ``toy-model`` tracks itself like the real stages do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sonosynth.infra.config import Config, ConfigError
from sonosynth.infra.jobdir import offline_dir_for
from sonosynth.infra.local_s3 import _free_port
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import open_storage
from sonosynth.infra.tracking import OFFLINE_FILE, Tracker, TrackingConfig
from sonosynth.launch import stages
from sonosynth.launch.pipeline import PipelineFailed, plan, resolve_pipeline, run
from sonosynth.launch.pipeline.config import DONE

RUNS: list[str] = []


class SourceConfig(Config):
    out: str
    """Output."""
    n: int = 3
    """How many."""
    progress: bool = True
    """Progress (not part of the key)."""


class ModelConfig(Config):
    out: str
    """Output."""
    data: str
    """The source's output."""
    scale: int = 1
    """A factor."""
    fail: bool = False
    """Fail after writing a partial file."""
    extra: list[str] = []
    """More inputs."""
    sources: dict[str, dict[str, str]] = {}
    """Named inputs."""
    tracking: TrackingConfig = TrackingConfig()
    """Tracking."""


def run_source(cfg: SourceConfig) -> Report:
    RUNS.append(f"source:{cfg.n}")
    open_storage(cfg.out).put_text("data.txt", str(cfg.n))
    return Report(stage="toy-source", out=cfg.out, text=f"wrote {cfg.n}", figures={"n": cfg.n},
                  outputs={"data": f"{cfg.out}/data.txt"})


def run_model(cfg: ModelConfig) -> Report:
    RUNS.append(f"model:{cfg.scale}")
    storage = open_storage(cfg.out)
    storage.put_text("partial.txt", "started")
    if cfg.fail:
        raise StageFailed("the toy model diverged\nsecond line of detail")
    n = int(Path(cfg.data).read_text())
    tracker = Tracker(cfg.tracking, experiment="toy", offline_dir=offline_dir_for(cfg.out))
    tracker.start(tags={"sonosynth.stage": "toy-model"})
    tracker.log_metrics({"value": n * cfg.scale}, 0)
    tracker.close()
    storage.put_text("model.txt", str(n * cfg.scale))
    return Report(stage="toy-model", out=cfg.out, figures={"value": n * cfg.scale},
                  outputs={"model": f"{cfg.out}/model.txt"},
                  tracking={"uri": tracker.uri, "run_id": tracker.run_id})


@pytest.fixture(autouse=True)
def toy_stages(monkeypatch):
    for name, cls, fn in (("toy-source", SourceConfig, run_source), ("toy-model", ModelConfig, run_model)):
        monkeypatch.setitem(stages.STAGES, name, stages.Stage(name, "t", lambda cls=cls, fn=fn: (cls, fn)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    RUNS.clear()


def recipe(tmp_path: Path, **extra) -> Path:
    data = {"out": str(tmp_path / "out"), "stages": {
        "src": {"stage": "toy-source", "n": 3},
        "model": {"stage": "toy-model", "data": "${src.outputs.data}", "scale": 2},
        **extra}}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def keys(path: Path, *sets: str) -> dict[str, str]:
    return {s.section: s.key for s in plan(resolve_pipeline(str(path), {}, list(sets)))}


def runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, order_by=["attributes.start_time ASC"]) if exps else []


def test_a_change_rekeys_that_section_and_its_dependents_only(tmp_path):
    path = recipe(tmp_path, other={"stage": "toy-source", "n": 5})
    base = keys(path)
    assert keys(path) == base, "keys are stable"
    assert keys(path, "src.progress=false", f"out={tmp_path / 'elsewhere'}") == base, "out/progress are not content"
    k = keys(path, "model.scale=3")
    assert k["src"] == base["src"] and k["other"] == base["other"] and k["model"] != base["model"]
    k = keys(path, "src.n=4")  # --set SECTION.key is short for stages.SECTION.key
    assert k["src"] != base["src"] and k["model"] != base["model"] and k["other"] == base["other"]


def test_sections_not_run_drop_the_mappings_and_items_that_read_them(tmp_path):
    path = recipe(tmp_path,
                  opt={"stage": "toy-source", "if_exists": str(tmp_path / "missing")},
                  mix={"stage": "toy-model", "data": "${src.outputs.data}",
                       "extra": ["${src.out}", "${opt.out}"],
                       "sources": {"a": {"d": "${src.out}"}, "b": {"d": "${opt.out}"}}},
                  needs={"stage": "toy-model", "data": "${opt.outputs.data}"})
    steps = {s.section: s for s in plan(resolve_pipeline(str(path), {}, []))}
    assert steps["opt"].skip and "missing" in steps["opt"].skip
    assert steps["needs"].skip == "it reads opt, which is not run"
    assert steps["mix"].skip is None
    (tmp_path / "missing").mkdir()
    steps2 = {s.section: s for s in plan(resolve_pipeline(str(path), {}, []))}
    assert steps2["mix"].key != steps["mix"].key and steps2["needs"].skip is None
    assert keys(path, "opt=null")["needs"] == ""  # a section set to null is not run either


def test_recipe_errors_name_the_section_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="runs later"):
        keys(recipe(tmp_path, early={"stage": "toy-model", "data": "${late.out}"}, late={"stage": "toy-source"}))
    with pytest.raises(ConfigError, match="names no section"):
        keys(recipe(tmp_path, x={"stage": "toy-model", "data": "${nope.out}"}))
    with pytest.raises(ConfigError, match="stages.x: unknown stage"):
        keys(recipe(tmp_path, x={"stage": "no-such-stage"}))
    with pytest.raises(ConfigError, match="(?s)pipeline section model.*scale"):
        keys(recipe(tmp_path), "model.scale=lots")
    with pytest.raises(ConfigError, match="only='nope' names no section"):
        resolve_pipeline(str(recipe(tmp_path)), {"only": "nope"}, [])


def test_finished_sections_are_skipped_and_a_change_reruns_only_what_it_feeds(tmp_path, read_report):
    path = recipe(tmp_path)
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    report = run(resolve_pipeline(str(path), {}, []))
    assert RUNS == ["source:3", "model:2"] and report.failed is None
    assert report.figures["ran"] == ["src", "model"]
    first = runs(uri)
    parent = [r for r in first if r.data.tags.get("sonosynth.stage") == "pipeline"]
    assert len(parent) == 1 and len(first) == 3
    children = {r.data.tags["sonosynth.pipeline_section"]: r for r in first if r not in parent}
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in first)
    assert children["src"].data.params["n"] == "3"  # the pipeline's own run for a stage that has none

    RUNS.clear()  # nothing changed: nothing runs, no new MLflow run
    again = run(resolve_pipeline(str(path), {}, []))
    assert RUNS == [] and again.figures["skipped"] == ["src", "model"]
    assert len(runs(uri)) == 3

    run(resolve_pipeline(str(path), {}, ["model.scale=5"]))
    assert RUNS == ["model:5"]
    rows = list(__import__("csv").DictReader((out / "lineage.csv").open()))
    assert [(r["section"], r["status"]) for r in rows] == [("src", "skipped (done)"), ("model", "ran")]
    model_row = rows[1]
    assert model_row["inputs"] == f"data={out}/src/{rows[0]['key']}/data.txt"
    assert model_row["outputs"] == f"model={out}/model/{model_row['key']}/model.txt"
    assert model_row["mlflow_run"] and (out / "model" / model_row["key"] / DONE).is_file()
    tables = read_report(out / "report.html")
    lineage = tables.tables["lineage-table"]
    assert lineage[0][:4] == ["section", "stage", "status", "key"] and [r[0] for r in lineage[1:]] == ["src", "model"]
    assert json.loads((out / "pipeline.json").read_text())["status"] == "FINISHED"


def test_a_failed_stage_fails_its_run_and_the_parent_and_the_rerun_resumes(tmp_path):
    path = recipe(tmp_path)
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    with pytest.raises(PipelineFailed) as info:
        run(resolve_pipeline(str(path), {}, ["model.fail=true"]))
    message = str(info.value)
    assert "\n" not in message and message.startswith("stage model (toy-model) failed: the toy model diverged")
    assert "re-run the same command to resume" in message and info.value.section == "model"
    by_section = {r.data.tags.get("sonosynth.pipeline_section") or "parent": r for r in runs(uri)}
    assert by_section["parent"].info.status == "FAILED"
    assert by_section["parent"].data.tags["sonosynth.failed_stage"] == "model"
    assert by_section["model"].info.status == "FAILED"
    assert "diverged" in by_section["model"].data.tags["sonosynth.error"]
    assert by_section["src"].info.status == "FINISHED"
    model_dirs = [p for p in (out / "model").iterdir()]
    assert (model_dirs[0] / "partial.txt").is_file() and not (model_dirs[0] / DONE).exists()
    assert json.loads((out / "pipeline.json").read_text())["failed"] == message

    RUNS.clear()
    report = run(resolve_pipeline(str(path), {}, []))
    assert RUNS == ["model:2"] and report.figures["skipped"] == ["src"]


def test_from_and_only_rerun_sections_and_keep_the_old_outputs(tmp_path):
    path = recipe(tmp_path)
    out = tmp_path / "out"
    run(resolve_pipeline(str(path), {}, []))
    RUNS.clear()
    run(resolve_pipeline(str(path), {"from_stage": "model"}, []))
    assert RUNS == ["model:2"]
    assert len(list((out / "model" / "_replaced").iterdir())) == 1
    RUNS.clear()
    run(resolve_pipeline(str(path), {"only": "src"}, []))
    assert RUNS == ["source:3"]
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(path.read_text().replace(str(out), str(tmp_path / "other")))
    with pytest.raises(ConfigError, match="reads section src, which has not finished"):
        run(resolve_pipeline(str(fresh), {"only": "model"}, []))


def test_a_down_tracking_server_does_not_stop_the_pipeline_and_is_replayed_later(tmp_path):
    path = recipe(tmp_path)
    dead = f"http://127.0.0.1:{_free_port()}"
    report = run(resolve_pipeline(str(path), {}, [f"tracking.uri={dead}", "tracking.request_timeout_s=1",
                                                  "tracking.request_retries=0"]))
    assert report.failed is None and RUNS == ["source:3", "model:2"]
    out = tmp_path / "out"
    assert len(list(out.rglob(OFFLINE_FILE))) == 3  # the parent's and both stages'

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    RUNS.clear()
    again = run(resolve_pipeline(str(path), {}, [f"tracking.uri={uri}"]))
    assert RUNS == [] and again.figures["skipped"] == ["src", "model"]
    assert not list(out.rglob(OFFLINE_FILE))
    found = runs(uri)
    parent = [r for r in found if r.data.tags.get("sonosynth.stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.run_id == again.tracking["run_id"]
    children = [r for r in found if r not in parent]
    assert sorted(r.data.tags["sonosynth.pipeline_section"] for r in children) == ["model", "src"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    assert next(r for r in children if r.data.tags["sonosynth.pipeline_section"] == "model").data.metrics["value"] == 6


@pytest.mark.skipif("train-sam" not in stages.STAGES, reason="the train-sam stage is not registered yet")
def test_the_demo_recipe_wires_every_section_and_leaves_out_the_real_samples_when_absent(tmp_path):
    from sonosynth.launch.pipeline.expressions import DROP, KEEP, _walk

    cfg = resolve_pipeline("demo", {"out": str(tmp_path)}, [f"hc18.if_exists={tmp_path / 'no-data'}"])
    steps = {s.section: s for s in plan(cfg)}
    assert [s for s, st in steps.items() if st.skip] == ["hc18", "eval_real_hc18", "eval_synthetic_hc18",
                                                          "eval_mask_hc18"]
    assert steps["promote"].uses == ["hc18", "real", "sam_synthetic"]
    absent = {"hc18"}

    def lookup(ref, _path):
        head = ref.split(".", 1)[0]
        return DROP if head in absent else f"<{ref}>" if head in steps else KEEP

    sam = _walk(steps["sam_synthetic"].data, lookup)
    assert set(sam["data"]["sources"]) == {"real", "synthetic"}  # the hc18 source is left out
    promote = _walk(steps["promote"].data, lookup)
    assert promote["evaluation"]["datasets"] == ["<real.out>"]
    assert promote["version"] == "<sam_synthetic.tracking.version>"
    with_data = {s.section: s for s in plan(resolve_pipeline("demo", {"out": str(tmp_path)},
                                                             [f"hc18.if_exists={tmp_path}"]))}
    assert not any(s.skip for s in with_data.values())
    assert with_data["real"].key == steps["real"].key and with_data["lora"].key == steps["lora"].key
    assert with_data["sam_synthetic"].key != steps["sam_synthetic"].key  # it trains on hc18 too
    assert with_data["promote"].key != steps["promote"].key


def test_promotion_rules_compare_the_metric_every_cohort_and_the_guards():
    from sonosynth.launch.promote import PromoteRules, combine, compare

    champion = combine([{"n_images": 10, "dice_mean": 0.80, "by_cohort": {"es": {"n_images": 10, "dice_mean": 0.80}}},
                        {"n_images": 30, "dice_mean": 0.90, "by_cohort": {"af": {"n_images": 30, "dice_mean": 0.90}}}],
                       ["dice_mean"])
    assert champion["overall"]["dice_mean"] == pytest.approx(0.875) and champion["n_images"] == 40
    better_everywhere = {"overall": {"dice_mean": 0.9},
                         "by_cohort": {"es": {"dice_mean": 0.85}, "af": {"dice_mean": 0.91}}}
    one_cohort_worse = {"overall": {"dice_mean": 0.9},
                        "by_cohort": {"es": {"dice_mean": 0.70}, "af": {"dice_mean": 0.97}}}
    rules = PromoteRules(margin=0.01, tolerance=0.02)
    ok, reason, checks = compare(better_everywhere, champion, rules)
    assert ok and reason.startswith("promoted") and [c["check"] for c in checks] == ["dice_mean", "dice_mean/af",
                                                                                     "dice_mean/es"]
    ok, reason, _ = compare(one_cohort_worse, champion, rules)
    assert not ok and "dice_mean/es 0.7000 vs 0.8000" in reason and "dice_mean/af" not in reason
    assert compare(one_cohort_worse, champion, PromoteRules(margin=0.01, per_cohort=False))[0]
    assert not compare(better_everywhere, champion, PromoteRules(margin=0.05))[0], "needs more than the margin"
    classifier = PromoteRules(metric="f1_macro", guards=["auc_ovr_macro"], per_cohort=False, tolerance=0.01)
    champ = {"overall": {"f1_macro": 0.80, "auc_ovr_macro": 0.90}}
    assert compare({"overall": {"f1_macro": 0.85, "auc_ovr_macro": 0.895}}, champ, classifier)[0]
    ok, reason, _ = compare({"overall": {"f1_macro": 0.85, "auc_ovr_macro": 0.85}}, champ, classifier)
    assert not ok and "auc_ovr_macro" in reason
    assert not compare({"overall": {"f1_macro": None}}, champ, classifier)[0], "a missing figure never promotes"


def test_shared_data_is_found_beside_the_checkout_from_any_working_folder(tmp_path, monkeypatch, shared_data):
    from sonosynth.launch.pipeline import shared_data_dir

    monkeypatch.delenv("SONOSYNTH_SHARED_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert shared_data_dir() == shared_data.resolve()
