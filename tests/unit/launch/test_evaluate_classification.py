"""evaluate for classifiers: a predictions CSV or a saved model scored on a dataset split; the
tables, summary, plot and MLflow run; per-centre figures on the real African sample."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from sonosynth.infra.config import ConfigError, build
from sonosynth.launch.evaluate.classification import (
    read_predictions_csv, run_classification,
)
from sonosynth.launch.evaluate.segmentation import EvaluateConfig
from sonosynth.trainers.evaluation.classification import classification_metrics

PLANES = ["abdomen", "brain", "femur", "thorax"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, make_phantom_dataset) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("eval-cls") / "ph", 60, PLANES, size=48)


def split_rows(dataset: Path, split: str) -> list[dict]:
    from sonosynth.datasets.indexed import ShardDataset

    ds = ShardDataset(str(dataset), split=split)
    return [{"key": ds.key(i), **ds.meta(i)} for i in range(len(ds))]


def write_csv(path: Path, rows: list[dict], classes: list[str], prefix: str = "prob_", wrong_every: int = 3,
              skip: int = 0) -> np.ndarray:
    """Probabilities favouring the true class, except every ``wrong_every``-th row; returns them."""
    probs = []
    lines = ["key," + ",".join(prefix + c for c in classes)]
    for i, r in enumerate(rows[skip:]):
        p = np.full(len(classes), 0.1 / (len(classes) - 1))
        k = classes.index(r["plane"])
        p[(k + 1) % len(classes) if i % wrong_every == 0 else k] = 0.9
        probs.append(p)
        lines.append(r["key"] + "," + ",".join(f"{v:.6f}" for v in p))
    path.write_text("\n".join(lines) + "\n")
    return np.array(probs)


def cfg(tmp_path: Path, mlflow: bool = False, **kw) -> EvaluateConfig:
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"} if mlflow else {"enabled": False}
    return build(EvaluateConfig, {"out": str(tmp_path / "eval"), "progress": False, "tracking": tracking,
                                            **kw})


def test_predictions_csv_is_scored_per_image_with_tables_plot_and_mlflow(phantom, tmp_path):
    rows = split_rows(phantom, "test")
    probs = write_csv(tmp_path / "p.csv", rows, PLANES)
    report = run_classification(cfg(tmp_path, mlflow=True, dataset=str(phantom),
                                    predictions_csv=str(tmp_path / "p.csv"), paper_compatible=True))
    out = tmp_path / "eval"
    assert {"per_image.parquet", "per_image.csv", "summary.json", "confusion.png", "config.yaml", "job.json"} <= {
        p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    expected = classification_metrics([r["plane"] for r in rows], probs, PLANES, paper_compatible=True)
    for name in ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "auc_ovr_macro",
                 "auc_paper_hard_label"):
        assert summary[name] == pytest.approx(expected.figures[name]), name
    assert summary["n"] == len(rows) and summary["classes"] == PLANES and summary["by_cohort"].keys() == {"unknown"}
    table = pq.read_table(out / "per_image.parquet").to_pylist()
    assert [t["key"] for t in table] == [r["key"] for r in rows]
    assert all(t["correct"] == (t["true"] == t["predicted"]) for t in table)
    np.testing.assert_allclose([[t[f"prob_{c}"] for c in PLANES] for t in table], probs, atol=1e-6)
    classes, again = read_predictions_csv(str(out / "per_image.csv"), None)  # the table is a predictions CSV too
    assert classes == PLANES and np.allclose([again[r["key"]] for r in rows], probs, atol=1e-6)
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.stage == "evaluate" and "accuracy" in report.text and "hard-label" in report.text
    assert report.outputs["summary"].endswith("summary.json")

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(report.tracking["run_id"])
    assert run.data.metrics["accuracy"] == pytest.approx(summary["accuracy"])
    assert run.data.tags["sonosynth.task"] == "classification"
    assert {"summary.json", "confusion.png", "per_image.parquet", "per_image.csv"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}


def test_csv_columns_named_by_class_missing_rows_and_unknown_planes(phantom, tmp_path):
    rows = split_rows(phantom, "test")
    known = [r for r in rows if r["plane"] != "abdomen"]
    write_csv(tmp_path / "p.csv", known, ["brain", "femur", "thorax"], prefix="")  # columns named by class
    classes, table = read_predictions_csv(str(tmp_path / "p.csv"), None)
    assert classes == ["brain", "femur", "thorax"] and len(table) == len(known)
    # abdomen samples are not in the label map: left out and counted; a sample without a row is missing
    write_csv(tmp_path / "q.csv", known[1:], ["brain", "femur", "thorax"], prefix="")
    report = run_classification(cfg(tmp_path, dataset=str(phantom), predictions_csv=str(tmp_path / "q.csv")))
    s = report.figures
    assert s["n"] == len(known) - 1 and s["missing_predictions"] == 1
    assert s["skipped_unknown_label"] == {"abdomen": len(rows) - len(known)}
    assert "not know" in report.text and "no row in the predictions CSV" in report.text
    with pytest.raises(ConfigError, match=r"no probability column for \['abdomen'\]"):
        read_predictions_csv(str(tmp_path / "q.csv"), PLANES)
    (tmp_path / "bad.csv").write_text("name,brain,femur\nx,0.5,0.5\n")
    with pytest.raises(ConfigError, match="no 'key' column"):
        read_predictions_csv(str(tmp_path / "bad.csv"), None)


def test_a_saved_model_is_scored_and_the_config_rules(phantom, tmp_path):
    from sonosynth.trainers.classifier import load_classifier
    from sonosynth.trainers.classifier.models import ClassifierModelConfig, build_classifier

    net = build_classifier(ClassifierModelConfig(backbone="tiny_resnet", image_size=32), PLANES)
    folder = net.save_pretrained(tmp_path / "model")
    (folder / "classifier.json").write_text(json.dumps({
        "format": 1, "backbone": "tiny_resnet", "labels": PLANES, "image_size": 32,
        "pixel_mean": list(net.pixel_mean), "pixel_std": list(net.pixel_std)}))
    report = run_classification(cfg(tmp_path, dataset=str(phantom), split="val", model=str(folder)))
    table = pq.read_table(tmp_path / "eval" / "per_image.parquet").to_pylist()
    rows = split_rows(phantom, "val")
    assert report.figures["n"] == len(rows) == len(table) and report.figures["model"] == str(folder)
    clf = load_classifier(folder)
    from sonosynth.datasets.indexed import ShardDataset

    ds = ShardDataset(str(phantom), split="val")
    np.testing.assert_allclose([[t[f"prob_{c}"] for c in PLANES] for t in table],
                               clf.predict_proba([ds[i]["image"] for i in range(len(ds))]), atol=1e-5)

    with pytest.raises(ConfigError, match="do not match the model's label map"):
        run_classification(cfg(tmp_path, dataset=str(phantom), model=str(folder), labels=["brain", "femur"],
                               out=str(tmp_path / "e2")))
    with pytest.raises(ConfigError, match="give one of predictions=FOLDER, model=URI or predictions_csv=FILE, not"):
        cfg(tmp_path, dataset="d", model="m", predictions_csv="p.csv")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        cfg(tmp_path, dataset="d")
    # another evaluation into the same folder is refused unless overwrite
    with pytest.raises(ConfigError, match="holds a different evaluate job"):
        run_classification(cfg(tmp_path, dataset=str(phantom), split="test", model=str(folder)))
    assert run_classification(cfg(tmp_path, dataset=str(phantom), split="test", model=str(folder),
                                  overwrite=True)).figures["split"] == "test"


def test_the_evaluate_stage_dispatches_a_predictions_csv_to_classification(phantom, tmp_path):
    from sonosynth.launch.evaluate.segmentation import run

    rows = split_rows(phantom, "test")
    write_csv(tmp_path / "p.csv", rows, PLANES)
    report = run(build(EvaluateConfig, {"dataset": str(phantom), "predictions_csv": str(tmp_path / "p.csv"),
                                        "out": str(tmp_path / "ns"), "progress": False,
                                        "tracking": {"enabled": False}}))
    assert report.figures["n"] == len(rows) and (tmp_path / "ns" / "summary.json").is_file()
    assert report.tracking["run_id"] is None and report.figures["classes"] == PLANES


def test_is_classification_tells_the_evaluate_dispatch(tmp_path):
    from sonosynth.launch.evaluate.classification import is_classification

    folder = tmp_path / "job" / "model"
    folder.mkdir(parents=True)
    (folder / "classifier.json").write_text("{}")
    sam = tmp_path / "sam"
    sam.mkdir()
    for model, expected in ((str(folder), True), (str(tmp_path / "job"), True), (str(sam), False),
                            ("models:/sonosynth-classifier@champion", True), ("models:/sonosynth-classifier/3", True),
                            ("models:/sonosynth-sam/3", False), ("runs:/abc/model", False), (None, False)):
        assert is_classification(SimpleNamespace(model=model, predictions_csv=None)) is expected, model
    assert is_classification(SimpleNamespace(model=None, predictions_csv="p.csv"))


def test_per_centre_figures_on_the_african_sample(shared_data, tmp_path):
    from sonosynth.datasets.ingest import IngestConfig, run_ingest

    africa = tmp_path / "africa"
    src = shared_data / "africa_planes_train"
    run_ingest(build(IngestConfig, {"out": str(africa), "cohort": {
        "name": "africa", "src": str(src), "index": str(src / "African_train.csv")}}), progress=False)
    rows = split_rows(africa, "test")
    probs = write_csv(tmp_path / "p.csv", rows, ["abdomen", "brain", "femur", "other", "thorax"])
    report = run_classification(cfg(tmp_path, dataset=str(africa), predictions_csv=str(tmp_path / "p.csv"),
                                    paper_compatible=True))
    s = report.figures
    centres = sorted({r["country"] for r in rows})
    assert sorted(s["by_cohort"]) == centres and sum(f["n"] for f in s["by_cohort"].values()) == len(rows)
    assert s["present"] == sorted({r["plane"] for r in rows}) and "other" not in s["present"]
    assert s["per_class"]["other"]["support"] == 0  # the model's class the African set lacks keeps its column
    expected = classification_metrics([r["plane"] for r in rows], probs, ["abdomen", "brain", "femur", "other",
                                                                          "thorax"],
                                      groups=[r["country"] for r in rows])
    for g in centres:
        assert s["by_cohort"][g]["accuracy"] == pytest.approx(expected.per_group[g].figures["accuracy"])
    assert all(f"{g}: " in report.text for g in centres)
