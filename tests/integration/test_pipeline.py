"""The demo pipeline recipe end to end, tiny: killed mid-way and resumed, then re-run unchanged, then
re-run with one section changed. Real stages, a real local Ray, a real MLflow store.

One module-scoped run backs every test: it is killed while the LoRA trains (after its first
checkpoint), then resumed to the end; the checks read the stage folders and the MLflow runs.
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
from pathlib import Path

import pytest

from sonosynth.infra.model_registry import Registry

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TINY = ["real.cohort.phantom.num=48", "hc18.splits.test=0.15", "lora.engine.max_steps=40",
        "lora.engine.checkpoint_every=10", "lora.preview.num=4", "synthetic.num_samples=16",
        "sam_real.engine.max_steps=10", "sam_synthetic.engine.max_steps=10", "sam_real.engine.eval_every=5",
        "sam_synthetic.engine.eval_every=5", "promote.evaluation.set.box_draws=2",
        "controlnet.engine.max_steps=10", "synthetic_mask.num_samples=8", "sam_mask.engine.max_steps=10",
        "sam_mask.engine.eval_every=5", "quality.bootstrap=50", "quality_mask.bootstrap=50",
        *(f"{s}.box_draws=2" for s in ("eval_real", "eval_real_hc18", "eval_synthetic", "eval_synthetic_hc18",
                                       "eval_mask", "eval_mask_hc18"))]


def command(out: Path, *extra: str) -> list[str]:
    sets = [x for s in [*TINY, *extra] for x in ("--set", s)]
    return ["pipeline", "demo", "--out", str(out), "--no-progress", *sets]


def runs_by_section(uri: str) -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found: dict[str, list] = {}
    for run in client.search_runs([client.get_experiment_by_name("sonosynth-demo").experiment_id]):
        tags = run.data.tags
        key = ("(parent)" if tags.get("sonosynth.stage") == "pipeline" else
               "(promote evaluations)" if tags.get("sonosynth.promote_role") else tags["sonosynth.pipeline_section"])
        found.setdefault(key, []).append(run)
    return found


def lineage(out: Path) -> dict[str, dict[str, str]]:
    return {row["section"]: row for row in csv.DictReader((out / "lineage.csv").open())}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, procs):
    """The demo killed while its LoRA trains, then resumed: (out, uri, the resumed run's stdout, facts)."""
    out = tmp_path_factory.mktemp("pipeline") / "demo"
    log = open(out.parent / "killed.log", "w")
    proc = procs.start(command(out), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        procs.wait_until(lambda: bool(list(out.glob("lora/*/checkpoints/step-*/_COMPLETE.json"))), proc,
                         what="the demo, before its first LoRA checkpoint")
    finally:
        procs.kill_tree(proc)
    [real_done] = out.glob("real/*/_PIPELINE_DONE.json")
    assert not list(out.glob("lora/*/_PIPELINE_DONE.json")), "the LoRA finished before it was killed"
    before = {"real_done": real_done.read_text(), "real_mtime": real_done.stat().st_mtime}
    resumed = procs.cli(command(out), cwd=REPO, timeout=900)
    return out, f"sqlite:///{out / 'mlflow.db'}", resumed.stdout, before


def test_a_killed_pipeline_resumes_and_skips_the_finished_stages(demo):
    out, uri, stdout, before = demo
    assert "[1/18] real (ingest): done earlier, skipped" in stdout
    [real_done] = out.glob("real/*/_PIPELINE_DONE.json")
    assert real_done.read_text() == before["real_done"] and real_done.stat().st_mtime == before["real_mtime"]
    [lora] = [p for p in (out / "lora").iterdir() if p.name != "_replaced"]
    assert json.loads((lora / "summary.json").read_text())["resumed_from_step"] >= 10
    runs = runs_by_section(uri)
    assert len(runs["real"]) == 1 and len(runs["lora"]) == 1, "one nested run per stage, the resumed one reopened"
    assert runs["lora"][0].info.status == "FINISHED"
    [parent] = runs["(parent)"]  # the killed pipeline's parent run, reopened and finished
    assert parent.info.status == "FINISHED"
    nested = [r for section, rs in runs.items() if not section.startswith("(") for r in rs]
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parent.info.run_id}
    # the promote run's own evaluations (challenger only: the first version) nest under it
    evaluations = runs["(promote evaluations)"]
    assert {r.data.tags["mlflow.parentRunId"] for r in evaluations} == {runs["promote"][0].info.run_id}
    rows = lineage(out)
    assert rows["real"]["status"] == "skipped (done)" and rows["lora"]["status"] == "ran"
    assert rows["lora"]["inputs"] == f"data.dataset={out}/real/{rows['real']['key']}"
    assert rows["lora"]["model_version"] == "sonosynth-lora v1"
    assert rows["promote"]["status"] == "ran"
    assert rows["sam_synthetic"]["model_version"] == "sonosynth-sam v1"
    # its LoRA followed it: generate --lora models:/sonosynth-lora@champion resolves, naming the promotion
    assert Registry(uri).client.get_model_version_by_alias("sonosynth-lora", "champion").tags[
        "sonosynth.promoted_with"] == "sonosynth-sam/1"


def test_the_demo_leaves_a_self_contained_report_and_says_where_it_is(demo, read_report):
    out, uri, stdout, before = demo
    assert f"report:   {out}/report.html" in stdout and f"ui --backend-store-uri {uri}" in stdout
    text = (out / "report.html").read_text()
    assert "<script" not in text and 'src="http' not in text and "file://" not in text
    page = read_report(out / "report.html")
    assert page.ids["status"] == "FINISHED"
    # the two generation modes' grids, t-SNE and worst pairs: every image inlined
    assert len(page.images) == 6 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for src in page.images)
    sections = [row[0] for row in page.tables["lineage-table"][1:]]
    assert sections == ["real", "hc18", "lora", "synthetic", "controlnet", "synthetic_mask", "sam_real", "quality",
                        "quality_mask", "sam_synthetic", "sam_mask", "eval_real", "eval_real_hc18", "eval_synthetic",
                        "eval_synthetic_hc18", "eval_mask", "eval_mask_hc18", "promote"]
    dice = page.tables["dice-table"]
    assert dice[0][:5] == ["cohort", "images", "dice_mean: real only", "dice_mean: real + synthetic (joint)",
                           "dice_mean: real + synthetic (mask mode)"]
    cohorts = {row[0]: row for row in dice[1:]}
    assert "phantom" in cohorts and all(0 <= float(v) <= 1 for v in cohorts["phantom"][2:5])
    if not lineage(out)["hc18"]["status"].startswith("not run"):
        assert all(float(v) >= 0 for v in cohorts["hc18"][2:5])
    # the two synthetic sets side by side: the same figures, each with a value
    side = page.tables["quality-side-by-side"]
    assert side[0] == ["figure", "quality: synthetic", "quality_mask: synthetic_mask"]
    figures = {row[0]: row[1:] for row in side[1:]}
    assert all(cell != "not measured" for cell in figures["FID"] + figures["label fidelity Dice"])
    assert page.ids["promotion-decision"].startswith("first")  # the first sonosynth-sam version
    promo = page.tables["promotion-table"]
    assert promo[1][0] == "dice_mean" and 0 <= float(promo[1][1]) <= 1
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["status"] == "FINISHED" and summary["tracking"]["run_id"]


def test_a_rerun_with_nothing_changed_does_nothing(demo, procs):
    out, uri, _, _ = demo
    count = sum(len(v) for v in runs_by_section(uri).values())
    proc = procs.cli(command(out), cwd=REPO)
    assert "ran 0 stages" in proc.stdout
    assert sum(len(v) for v in runs_by_section(uri).values()) == count


def test_changing_one_section_reruns_it_and_the_sections_after_it_only(demo, procs):
    out, uri, _, _ = demo
    old = lineage(out)
    changed, expect = "sam_synthetic.engine.max_steps=12", {"sam_synthetic", "eval_synthetic", "promote"}
    if not old["hc18"]["status"].startswith("not run"):  # the real samples are there
        expect.add("eval_synthetic_hc18")
    procs.cli(command(out, changed), cwd=REPO, timeout=900)
    new = lineage(out)
    ran = {s for s, row in new.items() if row["status"] == "ran"}
    assert ran == expect
    for section, row in new.items():
        if section in expect:
            assert row["key"] != old[section]["key"]
        elif row["status"] == "skipped (done)":
            assert row["key"] == old[section]["key"]
    # the new challenger was compared with the first champion; the decision is recorded
    decision = json.loads((out / "pipeline.json").read_text())["promotion"]
    assert decision["decision"] in ("promoted", "refused") and decision["champion_before"] == "1"
    assert decision["champion"]["overall"]["dice_mean"] is not None
