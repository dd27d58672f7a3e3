"""report.html explains itself: what ran at what scale and what its figures can support (first, before any
table), every Dice beside its box baseline with its spread, links relative to OUT to the files each section
wrote, wall times and MLflow runs, the promotion's lineage.

Small stages registered for the test stand in for the real ones with the real stages' figures:
``toy-ingest`` (splits), ``toy-train`` (steps and examples; a config.yaml naming its model, a preview
PNG, a model folder), ``toy-eval`` (Dice, its spread and the box baseline per cohort; summary.json and a
plot) and ``toy-promote`` (a promotion decision with its lineage).
"""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from PIL import Image

from sonosynth.infra.config import Config
from sonosynth.infra.stage import Report
from sonosynth.infra.storage import open_storage
from sonosynth.launch import stages
from sonosynth.launch.pipeline import resolve_pipeline, run
from sonosynth.launch.pipeline.report_dice import Scored
from sonosynth.launch.pipeline.report_links import Links, mlflow_run
from sonosynth.launch.pipeline.report_scale import Scale, Trained, describe_model, figures_mean


class IngestConfig(Config):
    out: str
    """Output."""
    n: int = 40
    """Images."""


class TrainConfig(Config):
    out: str
    """Output."""
    data: str
    """The dataset."""
    steps: int = 20
    """Training steps."""
    model: dict[str, Any] = {"arch": "tiny", "checkpoint": None}
    """The model (as train-sam names it)."""
    mode: str = "decoder"
    """What is trained."""


class EvalConfig(Config):
    out: str
    """Output."""
    model: str
    """The model."""
    n_images: int = 10
    """Test images."""
    dice: float = 0.55
    """Mean Dice."""
    std: float = 0.1
    """Its standard deviation over the images."""


class PromoteConfig(Config):
    out: str
    """Output."""
    model: str
    """The promoted model's training output."""
    synthetic: str
    """The synthetic set it was trained on."""


def _png(storage, key: str) -> None:
    data = io.BytesIO()
    Image.new("L", (6, 4), 120).save(data, "PNG")
    storage.put_bytes(key, data.getvalue())


def run_ingest(cfg: IngestConfig) -> Report:
    storage = open_storage(cfg.out)
    storage.put_text("manifest.parquet", "rows")
    test = cfg.n // 4
    return Report(stage="toy-ingest", out=cfg.out, figures={"ingested": cfg.n, "splits": {
        "train": cfg.n - 2 * test, "val": test, "test": test}},
        outputs={"dataset": cfg.out, "manifest": f"{cfg.out}/manifest.parquet"})


def run_train(cfg: TrainConfig) -> Report:
    storage = open_storage(cfg.out)
    storage.put_text("config.yaml", cfg.to_yaml())
    storage.put_text("summary.json", "{}")
    storage.put_text("model/weights.bin", "w")
    storage.put_text("checkpoints/step-1/state.json", "{}")
    _png(storage, "previews/final.png")
    return Report(stage="toy-train", out=cfg.out, figures={"steps": cfg.steps, "examples": 24},
                  outputs={"model": f"{cfg.out}/model"})


def run_eval(cfg: EvalConfig) -> Report:
    storage = open_storage(cfg.out)
    storage.put_text("summary.json", "{}")
    _png(storage, "dice_distribution.png")
    figures = {"n_images": cfg.n_images, "dice_mean": cfg.dice, "dice_std": cfg.std,
               "box_baseline_dice_mean": 0.86}
    return Report(stage="toy-eval", out=cfg.out, figures={**figures, "by_cohort": {"phantom": figures}},
                  outputs={"summary": f"{cfg.out}/summary.json"})


def run_promote(cfg: PromoteConfig) -> Report:
    open_storage(cfg.out).put_text("decision.json", "{}")
    synthetic = {"source": "synthetic", "dataset": cfg.synthetic, "lora": f"{cfg.synthetic}/lora",
                 "lora_model": "sonosynth-lora", "lora_version": "3"}
    lineage = {"lineage": {"model": "sonosynth-sam", "version": "7", "sources": {"synthetic": cfg.synthetic},
                           "synthetic": [synthetic]},
               "text": "sonosynth-lora champion is now version 3 (was 2)",
               "lora": {"model": "sonosynth-lora", "version": "3", "champion_after": "3"}}
    return Report(stage="toy-promote", out=cfg.out, outputs={"decision": f"{cfg.out}/decision.json"},
                  figures={"model": "sonosynth-sam", "version": "7", "decision": "promoted", "promoted": True,
                           "reason": "better", "champion_before": "6", "champion_after": "7",
                           "challenger": {"overall": {"dice_mean": 0.6}}, "lineage": lineage})


@pytest.fixture(autouse=True)
def toy_stages(monkeypatch):
    for name, cls, fn in (("toy-ingest", IngestConfig, run_ingest), ("toy-train", TrainConfig, run_train),
                          ("toy-eval", EvalConfig, run_eval), ("toy-promote", PromoteConfig, run_promote)):
        monkeypatch.setitem(stages.STAGES, name, stages.Stage(name, "t", lambda cls=cls, fn=fn: (cls, fn)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def pipeline(tmp_path: Path, *, steps: int, checkpoint: str | None, n_images: int, tracking: bool = False,
             out: str | None = None) -> Path:
    model = {"arch": "tiny" if checkpoint is None else "vit_b", "checkpoint": checkpoint}
    train = {"stage": "toy-train", "data": "${real.out}", "steps": steps, "model": model}
    evaluate = {"stage": "toy-eval", "n_images": n_images}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({
        "out": out or str(tmp_path / "out"), "tracking": {"enabled": tracking},
        "stages": {"real": {"stage": "toy-ingest", "n": max(40, 4 * n_images)},
                   "sam_real": train, "sam_synthetic": {**train, "mode": "lora"},
                   "eval_real": {**evaluate, "model": "${sam_real.outputs.model}", "dice": 0.55},
                   "eval_synthetic": {**evaluate, "model": "${sam_synthetic.outputs.model}", "dice": 0.56},
                   "promote": {"stage": "toy-promote", "model": "${sam_synthetic.out}", "synthetic": "${real.out}"}},
        "report": {"compare": {"real only": ["eval_real"], "real + synthetic": ["eval_synthetic"]},
                   "promote": "promote"}},
        sort_keys=False))
    return path


class Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs.append(dict(attrs)["href"])


def hrefs(text: str) -> list[str]:
    parser = Anchors()
    parser.feed(text)
    return parser.hrefs


def test_a_smoke_scale_run_says_so_first_and_links_the_files_each_section_wrote(tmp_path, read_report):
    run(resolve_pipeline(str(pipeline(tmp_path, steps=20, checkpoint=None, n_images=10, tracking=True)), {}, []))
    out = tmp_path / "out"
    text = (out / "report.html").read_text()
    first_table = min(text.index("<table"), text.index("<img") if "<img" in text else len(text))
    assert text.index('id="scale"') < text.index('id="what-figures-mean"') < first_table
    page = read_report(out / "report.html")
    meaning = page.ids["what-figures-mean"]
    assert meaning.startswith("Smoke-test scale. sam_real, sam_synthetic trained for 20 steps from random weights")
    assert "below the box baseline is expected" in meaning and "sonosynth sweep" in meaning
    assert "test sets are small (10 images per cohort" in meaning
    assert "The largest change here is +0.010, within the ±0.072 the test images alone allow" in meaning  # t(0.975, 9)
    assert "sam_real (toy-train): 20 steps on 24 examples, tiny model from random weights, mode decoder" \
        in page.ids["scale"]
    assert "sam_synthetic (toy-train): 20 steps on 24 examples, tiny model from random weights, mode lora" \
        in page.ids["scale"]
    assert "real 40 images (train 20, val 10, test 10)" in page.ids["scale"]

    links = hrefs(text)
    assert links and all(not h.startswith("/") and ":" not in h and (out / h).is_file() for h in links), links
    for section, name in (("sam_real", "previews/final.png"), ("sam_real", "summary.json"),
                          ("sam_real", "config.yaml"), ("eval_real", "dice_distribution.png"),
                          ("eval_real", "summary.json"), ("real", "manifest.parquet"), ("promote", "decision.json")):
        assert any(re.fullmatch(f"{section}/[0-9a-f]+/{name}", h) for h in links), (section, name)
    assert not [h for h in links if "/model/" in h or "/checkpoints/" in h or h.endswith("_PIPELINE_DONE.json")]

    lineage = page.tables["lineage-table"]
    assert not [cell for row in lineage for cell in row if str(tmp_path) in cell]
    cells = {row[0]: dict(zip(lineage[0], row)) for row in lineage[1:]}
    assert re.fullmatch(r"\d+\.\d s", cells["sam_real"]["wall time"])
    assert re.fullmatch(r"[0-9a-f]{32}", cells["sam_real"]["MLflow run"])
    assert cells["sam_real"]["inputs"] == f"data=real/{cells['real']['key']}"

    baseline = {row[2]: row for row in page.tables["dice-baseline"][1:]}
    assert baseline["eval_real"][4:] == ["0.5500", "0.1000", "[0.4785, 0.6215]", "0.8600", "-0.3100",
                                         "0.310 worse than the box baseline: the fine-tuning has not helped yet"]
    assert "box prompt" in page.ids["box-baseline"] and "single run, no interval" in page.ids["dice-intervals"]
    assert page.ids["promotion-lineage"].startswith(f"sonosynth-sam version 7 was trained on synthetic=real/"
                                                    f"{cells['real']['key']}")
    assert "sonosynth-lora champion is now version 3" in page.ids["promotion-lineage"]

    run(resolve_pipeline(str(pipeline(tmp_path, steps=20, checkpoint=None, n_images=10, tracking=True)), {}, []))
    again = read_report(out / "report.html").tables["lineage-table"]
    walls = {row[0]: dict(zip(again[0], row))["wall time"] for row in again[1:]}
    assert walls["sam_real"] == cells["sam_real"]["wall time"] + " (earlier run)"


def test_a_real_scale_run_gets_no_smoke_test_wording(tmp_path, read_report):
    run(resolve_pipeline(str(pipeline(tmp_path, steps=5000, checkpoint="/models/sam_vit_b_01ec64.pth",
                                      n_images=200)), {}, []))
    text = (tmp_path / "out" / "report.html").read_text()
    assert "smoke" not in text.lower()
    page = read_report(tmp_path / "out" / "report.html")
    assert page.ids["what-figures-mean"].startswith("Training ran 5000 steps per model (sam_real, sam_synthetic).")
    assert "test sets are small" not in page.ids["what-figures-mean"]
    assert "vit_b from sam_vit_b_01ec64.pth, mode decoder" in page.ids["scale"]
    assert "eval_real, eval_synthetic did not beat the box baseline" in page.ids["what-figures-mean"]


def scale(steps: int, checkpoint: bool, n: int, std: float = 0.1) -> Scale:
    trained = [Trained("sam", "train-sam", steps, 20, "vit_b", not checkpoint, {})]
    scored = [Scored("eval_a", "a", "hc18", n, 0.90, 0.85, std), Scored("eval_b", "b", "hc18", n, 0.93, 0.85, std)]
    return Scale(trained, [], scored, ["a", "b"], "dice_mean")


def test_what_the_figures_mean_follows_the_training_and_the_test_set_not_fixed_numbers():
    paper = figures_mean(scale(80, checkpoint=True, n=14))  # paper A's arm: 80 steps from a pretrained SAM
    assert "Smoke" not in paper and "test sets are small (14 images per cohort" in paper
    assert "±0.058" in paper  # t(0.975, 13) * 0.1 / sqrt(14)
    assert "Smoke-test scale" in figures_mean(scale(80, checkpoint=False, n=400))
    large = figures_mean(scale(3000, checkpoint=False, n=400, std=0.05))
    assert "Smoke" not in large and "test sets are small" not in large and "did not beat" not in large
    assert "+0.030, beyond the ±0.005 the test images alone allow; whether it is beyond what another seed" in large
    assert "sonosynth sweep" in large


def test_a_model_is_described_by_what_its_config_says():
    assert describe_model({"model": {"arch": "tiny", "checkpoint": None}, "mode": "decoder"}, "train-sam") == \
        ("tiny model from random weights, mode decoder", True)
    assert describe_model({"model": {"pretrained": None, "tiny": {}}, "lora": {"rank": 8}}, "train-lora") == \
        ("tiny model from random weights, LoRA rank 8", True)
    assert describe_model({"model": {"pretrained": "s3://bucket/sd15/"}, "lora": {"rank": 32}}, "train-lora") == \
        ("model from sd15, LoRA rank 32", False)
    assert describe_model({"model": {"backbone": "densenet169", "pretrained": "/w/d169.pth"}}, "train-classifier") \
        == ("densenet169 from d169.pth", False)
    assert describe_model({}, "train-x") == ("model", None)


def test_paths_are_relative_to_an_s3_out_and_mlflow_runs_link_to_an_http_store():
    r = SimpleNamespace(root="s3://bucket/runs/nightly", storage=SimpleNamespace(uri="s3://bucket/runs/nightly"))
    links = Links(r)
    assert links.relative("s3://bucket/runs/nightly/eval/ab12/summary.json") == "eval/ab12/summary.json"
    assert links.relative("s3://bucket/runs/nightly/") == ""
    assert links.relative("s3://bucket/runs/nightly-2/x") is None and links.relative("/data/hc18") is None
    r = SimpleNamespace(uri="sqlite:///x.db", reports={
        "a": {"tracking": {"uri": "https://user:secret@mlflow.example:5000/", "run_id": "abc123"}},
        "b": {"tracking": {"uri": "sqlite:////out/mlflow.db", "run_id": "def456"}}, "c": {}})
    cell = mlflow_run(r, "a")
    assert cell.startswith('<a href="https://') and cell.endswith('mlflow.example:5000/#/runs/abc123">abc123</a>')
    assert "secret" not in cell
    assert mlflow_run(r, "b") == "def456" and mlflow_run(r, "c") == ""


def test_the_links_of_a_report_in_s3_are_relative_keys_that_exist(tmp_path, s3_bucket):
    out = f"s3://{s3_bucket}/nightly"
    run(resolve_pipeline(str(pipeline(tmp_path, steps=20, checkpoint=None, n_images=10, out=out)), {}, []))
    storage = open_storage(out)
    links = hrefs(storage.get_text("report.html"))
    assert any(h.endswith("/dice_distribution.png") for h in links) and any(h.endswith("/final.png") for h in links)
    assert all(":" not in h and storage.exists(h) for h in links), links
