"""``sonosynth evaluate`` for plane classifiers: score a model (or a table of predicted
probabilities) on a dataset split, per image, per class and per centre.

Predictions come from a classifier (``model``: a train-classifier ``model/`` folder, local or
``s3://``, or ``models:/sonosynth-classifier/N``, ``models:/...@alias``, ``runs:/<id>/model``,
read by ``load_classifier``) or from a CSV (``predictions_csv``: a column ``key`` and one
probability column per class, named by the class or ``prob_<class>``). Every sample of the
split with a plane label is scored with ``classification_metrics``: the class order is the
model's label map (or ``labels``, or the CSV's columns), so a class the test set lacks (the
African set has no "other") keeps its column. The stage writes ``per_image.parquet`` and
``.csv`` (key, centre, true and predicted class, one probability per class), ``summary.json``
(accuracy, macro and weighted precision/recall/F1, ``auc_ovr_macro``, per class, per centre,
the confusion matrix, and ``auc_paper_hard_label`` with ``paper_compatible``) and
``confusion.png``, and logs them to MLflow (experiment sonosynth-evaluate).

``run_classification(cfg)`` takes the evaluate stage's ``EvaluateConfig`` (the stage,
``launch/evaluate/segmentation.py``, dispatches to it for a classifier or a predictions CSV).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sonosynth.infra.config import ConfigError
from sonosynth.infra.jobdir import claim_output
from sonosynth.infra.stage import Report
from sonosynth.infra.storage import StorageConfig, open_storage
from sonosynth.launch.evaluate.tracking import fmt as _fmt
from sonosynth.launch.evaluate.tracking import track
from sonosynth.infra.serialize import json_safe

CLASSIFIER_FILE = "classifier.json"
PROBS_PREFIX = "prob_"
PredictProba = Callable[[Sequence[np.ndarray]], np.ndarray]
"""uint8 images -> softmax probabilities [N, K] in the label map's order."""


def check_fields(cfg: Any) -> None:
    """The rules of the classification fields (EvaluateConfig checks model vs predictions_csv)."""
    labels = cfg.labels
    if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
        raise ConfigError(f"labels {labels} must be at least 2 distinct class names (or null)")
    if cfg.batch_size < 1:
        raise ConfigError("batch_size must be at least 1")


def identity(cfg: Any) -> dict[str, Any]:
    """What makes another classification evaluation."""
    return {"task": "classification", **{k: getattr(cfg, k) for k in (
        "dataset", "split", "model", "predictions_csv", "labels", "paper_compatible")}}


def is_classification(cfg: Any) -> bool:
    """Whether an evaluate config asks for classification: it names a ``predictions_csv``, or its
    ``model`` is a classifier (a folder or s3:// prefix holding classifier.json, or a
    ``models:/sonosynth-classifier...`` URI). For the evaluate stage's dispatch."""
    if cfg.predictions_csv:
        return True
    model = cfg.model
    if not model:
        return False
    model = str(model)
    if model.startswith("models:/"):
        return model.removeprefix("models:/").split("/")[0].split("@")[0] == "sonosynth-classifier"
    if model.startswith(("runs:/", "mlflow-artifacts:/")):
        return False  # unknown without downloading: set the task explicitly
    try:
        store = open_storage(model, getattr(cfg, "storage", None))
        return store.exists(CLASSIFIER_FILE) or store.exists(f"model/{CLASSIFIER_FILE}")
    except Exception:  # noqa: BLE001 - unreachable or odd URIs are not classifiers
        return False


# -- predictions ------------------------------------------------------------------------------------

def read_predictions_csv(uri: str, labels: Sequence[str] | None,
                         storage: StorageConfig | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    """(class order, key -> probabilities) of a predictions CSV."""
    import io

    import pyarrow.csv as pacsv

    if "://" in uri:
        base, name = uri.rstrip("/").rsplit("/", 1)
        data = open_storage(base, storage).get_bytes(name)
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise ConfigError(f"predictions_csv {path} does not exist")
        data = path.read_bytes()
    table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
        column_types={"key": "string"}))
    cols = table.column_names
    if "key" not in cols:
        raise ConfigError(f"predictions_csv {uri} has no 'key' column (columns: {cols}); name the sample key "
                          "column key")

    def column(c: str) -> str | None:
        return next((n for n in (c, f"{PROBS_PREFIX}{c}") if n in cols), None)

    if labels is None:
        labels = [n.removeprefix(PROBS_PREFIX) for n in cols if n != "key" and
                  (n.startswith(PROBS_PREFIX) or not any(c.startswith(PROBS_PREFIX) for c in cols))]
        labels = [c for c in labels if c not in ("true", "predicted", "correct", "centre", "split", "cohort")]
    missing = [c for c in labels if column(c) is None]
    if missing or len(labels) < 2:
        raise ConfigError(f"predictions_csv {uri} has no probability column for {missing or labels} (columns: "
                          f"{cols}); give one column per class named by the class or prob_<class>")
    probs = np.stack([np.asarray(table.column(column(c)).to_numpy(zero_copy_only=False), dtype=np.float64)
                      for c in labels], axis=1)
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise ConfigError(f"predictions_csv {uri} lists some keys more than once; give one row per sample")
    return list(labels), dict(zip(keys, probs))


def _model_predictor(cfg: Any) -> tuple[list[str], PredictProba, dict[str, Any]]:
    import torch

    from sonosynth.trainers.classifier import load_classifier

    model = cfg.model
    tracking = cfg.tracking
    uri = tracking.resolved_uri() if str(model).startswith(("models:/", "runs:/")) else None
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    clf = load_classifier(model, tracking_uri=uri, device=device, storage=cfg.storage)
    labels = cfg.labels
    if labels is not None and list(labels) != clf.labels:
        raise ConfigError(f"labels {list(labels)} do not match the model's label map {clf.labels}; drop labels "
                          "(the model's order is used)")
    batch = cfg.batch_size
    return clf.labels, lambda images: clf.predict_proba(images, batch), {
        "model_folder": str(clf.folder), "model_lineage_training": clf.lineage.get("training")}


# -- the stage --------------------------------------------------------------------------------------

def run_classification(cfg: Any, predict_proba: PredictProba | None = None,
                       labels: Sequence[str] | None = None) -> Report:
    """Score ``cfg.model`` (or ``cfg.predictions_csv``, or ``predict_proba`` with its ``labels``) on
    ``cfg.split`` of ``cfg.dataset``; write the tables, summary and plot to ``cfg.out`` and MLflow."""
    from sonosynth.datasets.indexed import ShardDataset
    from sonosynth.trainers.evaluation.classification import centre_of, classification_metrics, confusion_png

    if predict_proba is None:
        check_fields(cfg)
    storage_cfg = cfg.storage
    extra: dict[str, Any] = {}
    table: dict[str, np.ndarray] | None = None
    if predict_proba is not None:
        if labels is None:
            raise ValueError("run_classification(predict_proba=...) needs the labels of its columns")
        classes = list(labels)
    elif cfg.predictions_csv:
        classes, table = read_predictions_csv(cfg.predictions_csv, cfg.labels, storage_cfg)
    else:
        classes, predict_proba, extra = _model_predictor(cfg)
    out_storage = open_storage(cfg.out, storage_cfg)
    claim_output(out_storage, stage="evaluate", identity=identity(cfg), config_yaml=_yaml(cfg),
                 overwrite=cfg.overwrite)
    split = cfg.split
    ds = ShardDataset(cfg.dataset, split=split, storage=storage_cfg)
    order = range(len(ds))
    if cfg.progress:
        from sonosynth.infra.progress import track

        order = track(order, len(ds), "evaluate", "image")
    rows: list[dict[str, Any]] = []
    probs: list[np.ndarray] = []
    missing, no_label, unknown = [], 0, {}
    pending: list[tuple[dict[str, Any], np.ndarray]] = []
    batch = cfg.batch_size

    def flush() -> None:
        if pending:
            p = np.asarray(predict_proba([im for _, im in pending]), dtype=np.float64)
            rows.extend(r for r, _ in pending)
            probs.extend(p)
            pending.clear()

    for i in order:
        meta = ds.meta(i)
        key, plane = ds.key(i), meta.get("plane")
        if plane is None:
            no_label += 1
            continue
        if plane not in classes:
            unknown[plane] = unknown.get(plane, 0) + 1
            continue
        row = {"key": key, "cohort": meta.get("cohort"), "centre": centre_of(meta),
               "patient_id": meta.get("patient_id"), "split": meta.get("split"), "true": plane}
        if table is not None:
            if key not in table:
                missing.append(key)
                continue
            rows.append(row)
            probs.append(table[key])
        else:
            pending.append((row, ds[i]["image"]))
            if len(pending) >= batch:
                flush()
    flush()
    if not rows:
        raise ConfigError(f"nothing to score in {cfg.dataset} (split {split or 'all'}): {no_label} samples without a "
                          f"plane, {sum(unknown.values())} of planes outside {classes} ({unknown}), {len(missing)} "
                          "without a prediction; check the split and the labels")
    p = np.stack(probs)
    result = classification_metrics([r["true"] for r in rows], p, classes,
                                    groups=[r["centre"] for r in rows],
                                    paper_compatible=bool(cfg.paper_compatible))
    pred = p.argmax(axis=1)
    for r, pi, k in zip(rows, p, pred):
        r.update(predicted=classes[k], correct=r["true"] == classes[k])
        r.update({f"{PROBS_PREFIX}{c}": float(v) for c, v in zip(classes, pi)})
    summary = json_safe({
        **result.figures, "n": result.n, "classes": classes, "present": result.present,
        "per_class": result.per_class,
        "by_cohort": {g: {"n": r.n, **r.figures} for g, r in result.per_group.items()},
        "confusion": result.confusion.tolist(),
        "dataset": cfg.dataset, "split": split, "model": cfg.model,
        "predictions_csv": cfg.predictions_csv, "paper_compatible": bool(cfg.paper_compatible),
        "missing_predictions": len(missing), "missing_prediction_keys": missing[:100],
        "skipped_no_label": no_label, "skipped_unknown_label": unknown, **extra,
    })
    with tempfile.TemporaryDirectory(prefix="sonosynth-evaluate-") as tmp:
        folder = Path(tmp)
        files = _tables(rows, folder)
        (folder / "confusion.png").write_bytes(confusion_png(
            result, title=f"{Path(str(cfg.dataset)).name} ({split or 'all'}): n={result.n}, "
                          f"accuracy {result.figures['accuracy']:.1%}"))
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
        files += [folder / "confusion.png", folder / "summary.json"]
        for path in files:
            out_storage.put_file(path.name, path)
        tracking = _track(cfg, result, files)
    return _report(cfg, out_storage.url(""), summary, [p.name for p in files], tracking)


def _yaml(cfg: Any) -> str:
    if hasattr(cfg, "to_yaml"):
        return cfg.to_yaml()
    import yaml

    return yaml.safe_dump(identity(cfg), sort_keys=False)


def _tables(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    pq.write_table(table, folder / "per_image.parquet")
    pacsv.write_csv(table, folder / "per_image.csv")
    return [folder / "per_image.parquet", folder / "per_image.csv"]


def _track(cfg: Any, result, files: list[Path]) -> dict[str, Any]:
    return track(cfg, result.metrics(), files, {"sonosynth.task": "classification", "sonosynth.dataset": cfg.dataset})


def _report(cfg: Any, out: str, summary: dict[str, Any], names: list[str], tracking: dict[str, Any]) -> Report:
    what = cfg.model or cfg.predictions_csv or "the predictor"
    lines = [f"scored {summary['n']} images of {cfg.dataset} (split {summary['split'] or 'all'}) with {what}",
             f"  accuracy {_fmt(summary['accuracy'])}, macro F1 {_fmt(summary['f1_macro'])}, "
             f"macro precision {_fmt(summary['precision_macro'])}, macro recall {_fmt(summary['recall_macro'])}, "
             f"AUC (one-vs-rest, macro) {_fmt(summary['auc_ovr_macro'])}"]
    if summary.get("auc_paper_hard_label") is not None:
        lines.append(f"  paper-compatible hard-label 'AUC' {_fmt(summary['auc_paper_hard_label'])} "
                     "(for comparison with FU-LoRA only; not an AUC)")
    lines += [f"  {g}: {f['n']} images, accuracy {_fmt(f['accuracy'])}, macro F1 {_fmt(f['f1_macro'])}"
              for g, f in summary["by_cohort"].items()]
    skipped = summary["skipped_unknown_label"]
    if skipped:
        lines.append(f"  note: {sum(skipped.values())} samples of planes the classifier does not know were left out "
                     f"({skipped})")
    if summary["missing_predictions"]:
        lines.append(f"  WARNING: {summary['missing_predictions']} images have no row in the predictions CSV")
    if tracking.get("offline"):
        lines.append("warning: MLflow was unreachable; see tracking-offline/ and `sonosynth tracking-replay`")
    base = out.rstrip("/")
    outputs = {("per_image_csv" if n == "per_image.csv" else n.rsplit(".", 1)[0]): f"{base}/{n}" for n in names}
    return Report(stage="evaluate", out=out, text="\n".join(lines), tracking=tracking,
                  figures={k: v for k, v in summary.items() if k != "missing_prediction_keys"}, outputs=outputs)


__all__ = ["is_classification", "read_predictions_csv", "run_classification"]
