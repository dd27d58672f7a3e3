"""The demo pipeline recipe end to end, tiny: killed mid-way and resumed, then re-run unchanged, then
re-run with one section changed. Real stages, a real local Ray, a real MLflow store.

One module-scoped run backs every test: it is killed while the LoRA trains (after its first
checkpoint), then resumed to the end; the checks read the stage folders and the MLflow runs.
"""

from __future__ import annotations

import base64
import csv
import json
import re
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
    before["stderr"] = resumed.stderr
    return out, f"sqlite:///{out / 'mlflow.db'}", resumed.stdout, before


def test_a_killed_pipeline_resumes_and_skips_the_finished_stages(demo):
    out, uri, stdout, before = demo
    assert "[1/18] real (ingest): done earlier, skipped" in stdout
    [real_done] = out.glob("real/*/_PIPELINE_DONE.json")
    assert real_done.read_text() == before["real_done"] and real_done.stat().st_mtime == before["real_mtime"]
    lora = out / "lora" / lineage(out)["lora"]["key"]  # beside it: _replaced/, logs/
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


def test_the_console_holds_sonosynth_lines_only_and_each_section_names_its_logs(demo):
    out, _, stdout, facts = demo
    console = stdout + facts["stderr"] + (out.parent / "killed.log").read_text()  # the first run made the store
    for noise in ("(pid=", "RayTrainWorker", "TrainController", "core_worker", "FutureWarning", "DeepSpeed",
                  "Token authentication", "mlflow.store", "\r", "\x1b["):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    assert f"    logs: {out}/lora/logs" in stdout
    assert any(p.name.startswith("RayTrainWorker-") for p in (out / "lora" / "logs").iterdir())
    assert "Started a local Ray instance" in (out / "lora" / "logs" / "driver.log").read_text()
    # nothing after the final summary, whose last line names the pipeline's own logs (here: the lease the
    # killed run left, taken over)
    assert stdout.rstrip().splitlines()[-2:][0].startswith("MLflow: ")
    assert stdout.rstrip().splitlines()[-1] == f"logs: {out}/logs"
    assert "took over the lease" in (out / "logs" / "driver.log").read_text()


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


def test_the_report_says_what_its_figures_mean_and_links_every_stage_output(demo, read_report, browser):
    out, uri, _, _ = demo
    found = browser.check(out, "report.html", ids=("scale", "what-figures-mean"))
    # every image loads, every link is relative and resolves from the folder served as a whole
    assert len(found["images"]) == 6 and all(i["complete"] and i["width"] > 0 for i in found["images"]), \
        found["images"]
    links = found["links"]
    broken = [link for link in links if not link["same_origin"] or link["status"] != 200]
    assert links and not broken, broken
    hrefs = {link["href"] for link in links}
    assert not [h for h in hrefs if h.startswith("/") or ":" in h], hrefs
    rows = lineage(out)
    for section, name in (("synthetic", "samples_grid.png"), ("real", "manifest.parquet"),
                          ("eval_real", "dice_distribution.png"), ("eval_real", "summary.json"),
                          ("lora", "summary.json"), ("quality", "features_tsne.png"), ("promote", "decision.json")):
        assert f"{section}/{rows[section]['key']}/{name}" in hrefs, (section, name)
    # the first screen, before any table or image: what ran at what scale and what that can support
    assert found["tables_before"] == {"scale": 0, "what-figures-mean": 0}
    meaning, scale = found["texts"]["what-figures-mean"], found["texts"]["scale"]
    assert "Smoke-test scale" in meaning and "box baseline" in meaning and "sonosynth sweep" in meaning
    for section in ("lora", "sam_real", "sam_synthetic"):
        steps = json.loads(next((out / section).glob("*/summary.json")).read_text())["steps"]
        assert f"{section} ({rows[section]['stage']}): {steps} steps" in scale
    splits = json.loads(next(out.glob("real/*/_PIPELINE_DONE.json")).read_text())["report"]["figures"]["splits"]
    assert f"real {sum(splits.values())} images (train {splits['train']}" in scale

    page = read_report(out / "report.html")
    table = page.tables["lineage-table"]
    columns = table[0]
    cells = {row[0]: dict(zip(columns, row)) for row in table[1:]}
    assert not [c for row in table[1:] for c in row if str(out) in c], "paths are relative to OUT"
    assert cells["eval_real"]["outputs"].startswith(f"per_image=eval_real/{rows['eval_real']['key']}/")
    assert all(cells[s]["wall time"].endswith(" s") for s, r in rows.items() if r["status"] == "ran")
    assert re.fullmatch(r"\d+\.\d s \(earlier run\)", cells["real"]["wall time"])  # done before the kill
    assert cells["lora"]["MLflow run"] == rows["lora"]["mlflow_run"]
    # every Dice beside its box baseline, its spread over the test images, one run per arm said
    baseline = page.tables["dice-baseline"]
    evaluated = [s for s, row in rows.items() if s.startswith("eval_") and not row["status"].startswith("not run")]
    assert len(baseline) - 1 == len(evaluated)
    assert all(row[7] and row[9] for row in baseline[1:])
    assert "single run, no interval" in page.ids["dice-intervals"]
    champion = Registry(uri).alias("sonosynth-lora", "champion")
    assert f"sonosynth-lora champion is now version {champion}" in page.ids["promotion-lineage"]


def test_generate_draws_with_the_lora_the_promotion_made_champion(demo, procs, tmp_path):
    out, uri, _, _ = demo
    samples = tmp_path / "champion-samples"
    procs.cli(["generate", "generate_tiny", "--lora", "models:/sonosynth-lora@champion", "--num-samples", "4",
               "--out", str(samples), "--no-progress", "--set", f"tracking.uri={uri}"], cwd=REPO, timeout=600)
    summary = json.loads((samples / "summary.json").read_text())
    assert summary["accepted"] == 4 and summary["mode"] == "joint"
    champion = Registry(uri).alias("sonosynth-lora", "champion")
    assert lineage(out)["lora"]["model_version"] == f"sonosynth-lora v{champion}"  # the demo's LoRA drew them
    assert (samples / "samples_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_checker_sees_a_broken_image_and_a_broken_link(browser, tmp_path):
    (tmp_path / "there.txt").write_text("here")
    (tmp_path / "page.html").write_text('<p id="x">text</p><img id="gone" src="missing.png">'
                                        '<a href="there.txt">ok</a><a href="missing.txt">broken</a>')
    found = browser.check(tmp_path, "page.html", ids=("x",))
    assert [(i["id"], i["width"]) for i in found["images"]] == [("gone", 0)]
    assert {link["href"]: link["status"] for link in found["links"]} == {"there.txt": 200, "missing.txt": 404}
    assert found["texts"]["x"] == "text" and found["tables_before"] == {"x": 0}


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
