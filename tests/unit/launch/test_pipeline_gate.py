"""A quality section's gate decides the synthetic arm of a pipeline (launch/pipeline/gate.py).

Small stages registered for the test stand in for the real ones: ``toy-data`` (a dataset),
``quality`` (the quality stage's contract: summary figures with ``gate``, summary.json and the two
PNGs), ``toy-train`` (a training mix of ``data.sources``) and ``toy-eval`` (scores a model).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sonosynth.infra.config import Config, ConfigError
from sonosynth.infra.stage import Report
from sonosynth.infra.storage import open_storage
from sonosynth.launch import stages
from sonosynth.launch.pipeline import plan, resolve_pipeline, run

RUNS: list[str] = []


class DataConfig(Config):
    out: str
    """Output."""
    n: int = 3
    """Samples."""


class DatasetRef(Config):
    dataset: str
    """A dataset."""


class GateConfig(Config):
    label_fidelity_dice_min: float | None = None
    """Lowest label fidelity that passes."""
    fid_ratio_max: float | None = None
    """Highest FID ratio that passes."""
    on_fail: str = "skip_synthetic"
    """What the pipeline does when it fails."""


class QualityConfig(Config):
    out: str
    """Output."""
    real: DatasetRef
    """Real data."""
    synthetic: DatasetRef
    """The scored set."""
    gate: GateConfig = GateConfig()
    """The gate."""
    dice: float = 0.9
    """The label fidelity this toy 'measures'."""


class SourceRef(Config):
    dataset: str
    """A dataset."""
    count: int | None = None
    """How many."""


class MixConfig(Config):
    sources: dict[str, SourceRef]
    """Named sources."""


class TrainConfig(Config):
    out: str
    """Output."""
    data: MixConfig
    """The training mix."""


class EvalConfig(Config):
    out: str
    """Output."""
    model: str
    """The model."""
    dataset: str | None = None
    """Scored data."""


def _png(path: Path) -> None:
    Image.new("L", (4, 4), 200).save(path)


def run_data(cfg: DataConfig) -> Report:
    RUNS.append(f"data:{cfg.n}")
    open_storage(cfg.out).put_text("data.txt", str(cfg.n))
    return Report(stage="toy-data", out=cfg.out, figures={"n": cfg.n})


def run_quality(cfg: QualityConfig) -> Report:
    RUNS.append(f"quality:{cfg.dice}")
    limit = cfg.gate.label_fidelity_dice_min
    passed = limit is None or cfg.dice >= limit
    decision = (f"label fidelity Dice {cfg.dice:.2f} >= {limit}: the synthetic set is used" if passed else
                f"label fidelity Dice {cfg.dice:.2f} < {limit}: the synthetic set is not used")
    summary = {"n_real": 8, "n_synthetic": 6, "n_compared": 4, "fid": 12.5, "fid_ci": [10.0, 15.0],
               "fid_real_vs_real": 5.0, "fid_real_vs_real_ci": [4.0, 6.0], "fid_ratio": 2.5,
               "kid_mean": 0.031, "kid_std": 0.004, "kid_ci": [0.02, 0.04], "kid_real_vs_real_mean": 0.011,
               "kid_real_vs_real_std": 0.002, "precision": 0.7, "precision_ci": [0.6, 0.8],
               "precision_real_vs_real": 0.9, "recall": 0.4, "recall_real_vs_real": 0.85, "density": 0.8,
               "coverage": 0.6, "coverage_real_vs_real": 0.95, "label_fidelity_dice_mean": cfg.dice,
               "label_fidelity_dice_ci": [cfg.dice - 0.05, cfg.dice + 0.05], "label_fidelity_dice_mean_real": 0.93,
               "shape_distance": 0.21,
               "gate": {"passed": passed, "on_fail": cfg.gate.on_fail, "decision": decision,
                        "checks": [] if limit is None else [{"name": "label_fidelity_dice_min", "value": cfg.dice,
                                                             "limit": limit, "passed": passed}]}}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary))
    _png(out / "features_tsne.png")
    _png(out / "worst_fidelity.png")
    return Report(stage="quality", out=cfg.out, text=decision, figures=summary,
                  outputs={"summary": f"{cfg.out}/summary.json", "tsne": f"{cfg.out}/features_tsne.png",
                           "worst": f"{cfg.out}/worst_fidelity.png"})


def run_train(cfg: TrainConfig) -> Report:
    RUNS.append("train:" + "+".join(sorted(cfg.data.sources)))
    open_storage(cfg.out).put_text("model.txt", ",".join(cfg.data.sources))
    return Report(stage="toy-train", out=cfg.out, outputs={"model": f"{cfg.out}/model.txt"})


def run_eval(cfg: EvalConfig) -> Report:
    RUNS.append(f"eval:{Path(cfg.model).parent.parent.name}" + (":synthetic-set" if cfg.dataset else ""))
    return Report(stage="toy-eval", out=cfg.out, figures={"dice_mean": 0.8})


@pytest.fixture(autouse=True)
def toy_stages(monkeypatch):
    for name, cls, fn in (("toy-data", DataConfig, run_data), ("quality", QualityConfig, run_quality),
                          ("toy-train", TrainConfig, run_train), ("toy-eval", EvalConfig, run_eval)):
        monkeypatch.setitem(stages.STAGES, name, stages.Stage(name, "t", lambda cls=cls, fn=fn: (cls, fn)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    RUNS.clear()


def sections(on_fail: str = "skip_synthetic", dice: float = 0.2, limit: float | None = 0.5) -> dict:
    return {
        "real": {"stage": "toy-data", "n": 3},
        "synthetic": {"stage": "toy-data", "n": 5},
        "quality": {"stage": "quality", "real": {"dataset": "${real.out}"},
                    "synthetic": {"dataset": "${synthetic.out}"}, "dice": dice,
                    "gate": {"label_fidelity_dice_min": limit, "on_fail": on_fail}},
        "train_real": {"stage": "toy-train", "data": {"sources": {"real": {"dataset": "${real.out}"}}}},
        "train_mix": {"stage": "toy-train", "data": {"sources": {"real": {"dataset": "${real.out}"},
                                                                 "synthetic": {"dataset": "${synthetic.out}"}}}},
        "train_synthetic": {"stage": "toy-train", "data": {"sources": {"synthetic": {"dataset": "${synthetic.out}"}}}},
        "eval_real": {"stage": "toy-eval", "model": "${train_real.outputs.model}"},
        "eval_mix": {"stage": "toy-eval", "model": "${train_mix.outputs.model}"},
        "eval_on_synthetic": {"stage": "toy-eval", "model": "${train_real.outputs.model}",
                              "dataset": "${synthetic.out}"},
        "eval_synthetic": {"stage": "toy-eval", "model": "${train_synthetic.outputs.model}"},
    }


def recipe(tmp_path: Path, stages_: dict, tracking: bool = False) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "tracking": {"enabled": tracking},
                                    "stages": stages_}, sort_keys=False))
    return path


def statuses(out: Path) -> dict[str, str]:
    return {row["section"]: row["status"] for row in json.loads((out / "pipeline.json").read_text())["stages"]}


def test_a_failed_gate_skips_the_synthetic_arm_and_a_resume_keeps_the_decision(tmp_path, capsys, read_report):
    path, out = recipe(tmp_path, sections()), tmp_path / "out"
    report = run(resolve_pipeline(str(path), {}, []))
    assert report.failed is None
    assert RUNS == ["data:3", "data:5", "quality:0.2", "train:real", "eval:train_real"]
    decision = "label fidelity Dice 0.20 < 0.5: the synthetic set is not used"
    arm = ["train_mix", "train_synthetic", "eval_mix", "eval_on_synthetic", "eval_synthetic"]
    status = statuses(out)
    assert {s: status[s] for s in arm} == {s: f"gated by quality: {decision}" for s in arm}
    assert all(status[s] == "ran" for s in ("real", "synthetic", "quality", "train_real", "eval_real"))
    assert report.figures["gated"] == arm
    assert report.figures["gates"]["quality"]["passed"] is False
    console = capsys.readouterr().out
    assert f"[3/10] quality (quality): gate failed (skip_synthetic): {decision}; not run (gated): " \
           f"{', '.join(arm)}" in console
    assert f"[5/10] train_mix (toy-train): gated by quality: {decision}" in console
    lineage = {row["section"]: row for row in csv.DictReader(io.StringIO((out / "lineage.csv").read_text()))}
    assert lineage["quality"]["gate"].startswith("gate failed") and lineage["eval_mix"]["gate"] == "gated by quality"

    page = read_report(out / "report.html")
    table = {row[0]: row[1:] for row in page.tables["quality-table-quality"]}
    assert table["FID"] == ["12.5000", "[10.0000, 15.0000]", "5.0000", "[4.0000, 6.0000]"]
    assert table["KID (mean ± std over subsets)"][:3] == ["0.0310 ± 0.0040", "[0.0200, 0.0400]", "0.0110 ± 0.0020"]
    assert table["precision"][:3] == ["0.7000", "[0.6000, 0.8000]", "0.9000"]
    assert table["label fidelity Dice (baseline: real pairs)"][::2] == ["0.2000", "0.9300"]
    assert table["shape distance (mask shape statistics vs real)"][0] == "0.2100"
    assert page.ids["gate-quality"].startswith(f"gate failed: {decision}")
    assert "not run (gated): train_mix" in page.ids["gate-quality"]
    assert page.tables["gate-checks-quality"][1] == ["label_fidelity_dice_min", "0.2000", "0.5000", "NO"]
    assert sum(src.startswith("data:image/png;base64,") for src in page.images) == 2  # t-SNE, worst pairs
    assert [r[2] for r in page.tables["lineage-table"][1:] if r[0] == "eval_mix"] == [status["eval_mix"]]

    RUNS.clear()  # resumed: the quality section is read back, the same sections are gated, nothing runs
    again = run(resolve_pipeline(str(path), {}, []))
    assert RUNS == [] and again.figures["gated"] == arm
    assert {s: statuses(out)[s] for s in arm} == {s: status[s] for s in arm}
    assert "[3/10] quality (quality): gate failed" in capsys.readouterr().out


def test_train_without_drops_the_synthetic_source_and_a_resume_keeps_it(tmp_path, capsys):
    path, out = recipe(tmp_path, sections(on_fail="train_without"), tracking=True), tmp_path / "out"
    planned = {s.section: s.key for s in plan(resolve_pipeline(str(path), {}, []))}
    report = run(resolve_pipeline(str(path), {}, []))
    assert RUNS == ["data:3", "data:5", "quality:0.2", "train:real", "train:real", "eval:train_real",
                    "eval:train_mix"]
    status = statuses(out)
    assert status["train_mix"] == "ran" and status["eval_mix"] == "ran"
    gated = ["train_synthetic", "eval_on_synthetic", "eval_synthetic"]  # nothing to train on / reads the set itself
    assert report.figures["gated"] == gated and all(status[s].startswith("gated by quality: ") for s in gated)
    stages_ = report.figures["stages"]
    assert stages_["train_mix"]["key"] != planned["train_mix"] and stages_["eval_mix"]["key"] != planned["eval_mix"]
    assert stages_["train_real"]["key"] == planned["train_real"]
    assert (out / "train_mix" / stages_["train_mix"]["key"] / "model.txt").read_text() == "real"
    assert "[5/10] train_mix (toy-train): running without data.sources.synthetic (gate quality failed: " \
           in capsys.readouterr().out
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["gates"]["quality"]["without"] == {"train_mix": ["synthetic"]}
    assert [r["gate"] for r in summary["stages"] if r["section"] == "train_mix"] == [
        "without data.sources.synthetic (gate quality failed)"]

    RUNS.clear()
    again = run(resolve_pipeline(str(path), {}, []))
    keys = {section: v["key"] for section, v in stages_.items()}
    assert RUNS == [] and again.failed is None and {k: v["key"] for k, v in again.figures["stages"].items()} == keys
    assert {s: v["status"] for s, v in again.figures["stages"].items() if s in gated} == {s: status[s] for s in gated}
    assert "train_mix (toy-train): done earlier without data.sources.synthetic" in capsys.readouterr().out
    only = run(resolve_pipeline(str(path), {"only": "eval_mix"}, []))  # reads train_mix's gated plan
    assert RUNS == ["eval:train_mix"] and only.figures["stages"]["eval_mix"]["key"] == keys["eval_mix"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = [r for r in client.search_runs(exps) if r.data.tags.get("sonosynth.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # reopened by every resume, params unchanged
    assert parents[0].data.params["key.train_mix"] == planned["train_mix"]
    assert parents[0].data.tags["sonosynth.gate.quality"].startswith("gate failed (train_without): ")


def test_a_passing_gate_changes_nothing(tmp_path, capsys, read_report):
    path, out = recipe(tmp_path, sections(dice=0.9)), tmp_path / "out"
    planned = {s.section: s.key for s in plan(resolve_pipeline(str(path), {}, []))}
    report = run(resolve_pipeline(str(path), {}, []))
    assert set(statuses(out).values()) == {"ran"} and report.figures["gated"] == []
    assert {k: v["key"] for k, v in report.figures["stages"].items()} == planned
    assert "train:real+synthetic" in RUNS and "eval:train_real:synthetic-set" in RUNS
    decision = "label fidelity Dice 0.90 >= 0.5: the synthetic set is used"
    assert f"[3/10] quality (quality): gate passed: {decision}" in capsys.readouterr().out
    assert read_report(out / "report.html").ids["gate-quality"] == f"gate passed: {decision}"


def test_a_section_reading_the_scored_set_above_its_gate_is_refused(tmp_path):
    bad = sections()
    bad = {k: bad[k] for k in ("real", "synthetic", "train_mix", "quality", "eval_mix")}
    with pytest.raises(ConfigError, match=r"stages.quality gates the sections that read synthetic, but train_mix "
                                          r"reads synthetic and comes before quality.*move quality right below "
                                          r"synthetic"):
        plan(resolve_pipeline(str(recipe(tmp_path, bad)), {}, []))
    ungated = {**bad, "quality": {**bad["quality"], "gate": {"label_fidelity_dice_min": None}}}
    steps = plan(resolve_pipeline(str(recipe(tmp_path, ungated)), {}, []))  # no limit: it cannot fail
    assert [s.section for s in steps if s.skip] == []
