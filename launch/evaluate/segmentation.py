"""The ``evaluate`` stage: score segmentation masks per image and per cohort, against the box baseline.

Predictions come from a folder (or ``s3://`` prefix) of mask PNGs named ``<sample key>.png``
(pixels above ``threshold`` are foreground; a prediction of another size is resized to the
image, bilinear then >= 0.5), from a SAM fine-tuned by train-sam (``model``: a folder, an
``s3://`` prefix or ``models:/sonosynth-sam@champion``; ``model_predictor``), or from a
``predict_fn(sample, boxes) -> masks`` handed to ``run``. Each
image with a mask gets ``box_draws`` box prompts (seeded by (seed, key)), the prediction(s)
and the box baseline are scored (``sonosynth.trainers.evaluation.segmentation``), and the
stage writes ``per_image.parquet``/``.csv``, ``summary.json`` (overall and ``by_cohort``),
``dice_distribution.png`` and ``worst_cases.png``, all logged to MLflow. docs/segmentation.md
says how to read them.
"""

from __future__ import annotations

import heapq
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import model_validator

from sonosynth.datasets.records import Sample, decode_png
from sonosynth.infra.config import Config, ConfigError
from sonosynth.infra.jobdir import claim_output
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.serialize import json_safe
from sonosynth.infra.stage import Report
from sonosynth.infra.storage import StorageConfig, open_storage
from sonosynth.infra.tracking import TrackingConfig
from sonosynth.launch.evaluate.tracking import fmt as _fmt
from sonosynth.launch.evaluate.tracking import track

log = logging.getLogger(__name__)
PredictFn = Callable[[Sample, np.ndarray], np.ndarray]
"""(sample, boxes [K, 4] XYXY in image pixels) -> masks [K, H, W] (one per box), or one [H, W]
mask when the prediction ignores prompts. Raise ``MissingPrediction`` to skip an image."""


class MissingPrediction(LookupError):
    """No prediction for this sample; it is counted and listed, not scored."""


class EvaluateConfig(Config):
    """``sonosynth evaluate``: score predicted masks on a dataset split, per image and per cohort."""

    dataset: str
    """Dataset folder or s3:// prefix (from ingest or generate) holding the images and masks."""
    split: str | None = "test"
    """Score the samples of this split (null: every sample)."""
    predictions: str | None = None
    """Folder or s3:// prefix of predicted masks, one PNG per sample named <sample key>.png."""
    model: str | None = None
    """A SAM fine-tuned by train-sam to predict with: its model/ folder, an s3:// prefix, or an MLflow
    URI (models:/sonosynth-sam@champion, models:/sonosynth-sam/3, runs:/<run id>/model)."""
    base_checkpoint: str | None = None
    """Local .pth of the base SAM a decoder or LoRA model was fine-tuned from, when it is not at the
    path its config.yaml records (e.g. /models/sam_vit_b_01ec64.pth on another machine)."""
    out: str = "runs/evaluate"
    """Where the per-image table, summary.json and plots go: a folder or s3:// prefix."""
    box_draws: int = 5
    """K box prompts per image (paper A: 5); figures are means over the draws."""
    jitter_px: int = 19
    """Each box side is pushed out by a random 0..jitter_px px (at 256 px, scaled to the image)."""
    seed: int = 0
    """Seed of the box draws (image key k, draw d: the same box in every run)."""
    resolution: int = 256
    """Also score with both masks resized to this square size (paper A: 256)."""
    threshold: int = 127
    """Prediction PNG pixels above this value are foreground."""
    worst_cases: int = 8
    """How many of the lowest-Dice images to draw in worst_cases.png (0: none)."""
    fail_on_missing: bool = False
    """Mark the stage failed (exit 1) when any image has no prediction (outputs still written)."""
    overwrite: bool = False
    """Allow writing into an output folder that holds another evaluation."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking of the evaluation."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the storage (dataset, predictions and output)."""
    progress: bool = True
    """Show a progress bar."""
    task: Literal["auto", "segmentation", "classification"] = "auto"
    """What is scored: 'auto' is classification for predictions_csv or a classifier model
    (models:/sonosynth-classifier..., a folder with classifier.json), else segmentation."""
    predictions_csv: str | None = None
    """Classification: a CSV of predicted probabilities (key, then one column per class)."""
    labels: list[str] | None = None
    """Classification: the class order of predictions_csv (null: its header)."""
    paper_compatible: bool = False
    """Classification: also report FU-LoRA's hard-label AUC (flawed; docs/classification.md)."""
    batch_size: int = 32
    """Classification: images per forward pass of the model."""
    device: str | None = None
    """Classification: torch device of the model (null: cuda when available, else cpu)."""

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        given = [name for name in ("predictions", "model", "predictions_csv") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give one of predictions=FOLDER, model=URI or predictions_csv=FILE, not {given}")
        if not given:
            raise ValueError("nothing to evaluate: pass predictions=FOLDER (mask PNGs named <sample key>.png), "
                             "model=URI (e.g. models:/sonosynth-sam@champion or models:/sonosynth-classifier@champion)"
                             " or predictions_csv=FILE (class probabilities per key)")
        for name in ("box_draws", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.jitter_px < 0 or self.worst_cases < 0:
            raise ValueError("jitter_px and worst_cases must be 0 or more")
        if not 0 <= self.threshold < 255:
            raise ValueError("threshold must be in 0..254")
        return self

    def job_identity(self) -> dict[str, Any]:
        """What makes another evaluation (anything else, e.g. tracking, may change on a re-run)."""
        return {k: getattr(self, k) for k in ("dataset", "split", "predictions", "model", "box_draws",
                                              "jitter_px", "seed", "resolution", "threshold")}


def model_predictor(cfg: EvaluateConfig) -> PredictFn:
    """The predictor of ``cfg.model``: a SAM fine-tuned by train-sam (a model/ folder, an s3://
    prefix or an MLflow URI such as models:/sonosynth-sam@champion, fetched from
    ``cfg.tracking``'s server), loaded once (``sonosynth.trainers.sam.load_sam_model``); each
    image is predicted with all its box draws at the size the model was trained at."""
    import torch

    from sonosynth.infra.model_registry import is_mlflow_uri
    from sonosynth.trainers.sam.models import load_sam_model, predict_masks

    tracking_uri = cfg.tracking.resolved_uri() if is_mlflow_uri(cfg.model) else None
    try:
        sam = load_sam_model(cfg.model, tracking_uri, base_checkpoint=cfg.base_checkpoint,
                             device="cuda" if torch.cuda.is_available() else "cpu")
    except FileNotFoundError as err:
        raise ConfigError(f"model={cfg.model!r}: {err}") from None

    def predict(sample: Sample, boxes: np.ndarray) -> np.ndarray:
        return predict_masks(sam, sample.image, boxes)

    return predict


class FolderPredictions:
    """Masks from ``<uri>/<key>.png``, listed once; the same mask for every box draw."""

    def __init__(self, uri: str, storage: StorageConfig, threshold: int = 127):
        self.storage = open_storage(uri, storage)
        self.threshold = threshold
        self.available = {k[:-4] for k in self.storage.list("") if k.endswith(".png") and "/" not in k}
        if not self.available:
            raise ConfigError(f"{self.storage.uri} holds no .png predictions; name them <sample key>.png")
        self.used: set[str] = set()
        self.resized = 0

    def __call__(self, sample: Sample, boxes: np.ndarray) -> np.ndarray:
        if sample.key not in self.available:
            raise MissingPrediction(sample.key)
        self.used.add(sample.key)
        pred = decode_png(self.storage.get_bytes(f"{sample.key}.png")) > self.threshold
        if pred.shape != sample.image.shape[:2]:
            from sonosynth.datasets.augment import resize_mask

            self.resized += 1
            pred = resize_mask(pred, sample.image.shape[:2]).numpy().astype(bool)
        return pred


def _tables(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
    pq.write_table(table, folder / "per_image.parquet")
    flat = table.select([n for n in table.column_names if not n.endswith("_by_draw")])
    pacsv.write_csv(flat, folder / "per_image.csv")
    return [folder / "per_image.parquet", folder / "per_image.csv"]


def run(cfg: EvaluateConfig, predict_fn: PredictFn | None = None) -> Report:
    """Score every image of ``cfg.split`` that has a mask (or, for a classifier, a label); see the
    module docstring. Classification goes to ``launch.evaluate_classification``."""
    from sonosynth.datasets.reader import DatasetReader
    from sonosynth.launch.evaluate.classification import is_classification, run_classification
    from sonosynth.trainers.evaluation.segmentation import draw_boxes, overlay, plots, score_image, summarize

    if predict_fn is None and (cfg.task == "classification" or (cfg.task == "auto" and is_classification(cfg))):
        return run_classification(cfg)
    folder = None
    if predict_fn is None:
        if cfg.model:
            predict_fn = model_predictor(cfg)
        else:
            predict_fn = folder = FolderPredictions(cfg.predictions, cfg.storage, cfg.threshold)
    storage = open_storage(cfg.out, cfg.storage)
    claim_output(storage, stage="evaluate", identity=cfg.job_identity(), config_yaml=cfg.to_yaml(),
                 overwrite=cfg.overwrite)
    reader = DatasetReader(cfg.dataset, split=cfg.split, storage=cfg.storage, distributed=False)
    samples = reader.samples()
    if cfg.progress:
        from sonosynth.infra.progress import track

        samples = track(samples, len(reader), "evaluate", "image")
    rows, missing, worst, no_mask = [], [], [], 0
    for sample in samples:
        if sample.mask is None:
            no_mask += 1
            continue
        gt = sample.mask > 127
        rng = np.random.default_rng(derive_seed("evaluate-box", cfg.seed, sample.key))
        boxes = draw_boxes(gt, cfg.box_draws, cfg.jitter_px, rng)
        try:
            preds = np.asarray(predict_fn(sample, boxes))
        except MissingPrediction:
            missing.append(sample.key)
            continue
        meta = sample.meta
        row = {"key": sample.key, "cohort": meta.get("cohort"), "source": meta.get("source"),
               "split": meta.get("split"), "plane": meta.get("plane"), "width": int(gt.shape[1]),
               "height": int(gt.shape[0]), "hc_official_mm": meta.get("hc_mm")}
        row.update(score_image(gt, preds, boxes, pixel_size_mm=meta.get("pixel_size_mm"),
                               resolution=cfg.resolution))
        rows.append(row)
        if cfg.worst_cases and (len(worst) < cfg.worst_cases or -row["dice"] > worst[0][0]):
            first = preds if preds.ndim == 2 else preds[0]
            entry = (-row["dice"], len(rows), sample.key, overlay(sample.image, gt, first, boxes[0]),
                     row["box_baseline_dice"])
            (heapq.heappush if len(worst) < cfg.worst_cases else heapq.heappushpop)(worst, entry)
    summary = summarize(rows, cfg.resolution)
    cohorts = sorted({r["cohort"] or "unknown" for r in rows})
    summary["by_cohort"] = {c: summarize([r for r in rows if (r["cohort"] or "unknown") == c], cfg.resolution)
                            for c in cohorts}
    summary.update(missing_predictions=len(missing), missing_prediction_keys=missing, skipped_no_mask=no_mask,
                   dataset=cfg.dataset, split=cfg.split, predictions=cfg.predictions, model=cfg.model,
                   box_draws=cfg.box_draws, jitter_px=cfg.jitter_px, seed=cfg.seed, resolution=cfg.resolution)
    if folder is not None:
        summary.update(resized_predictions=folder.resized, unused_predictions=len(folder.available - folder.used))
    summary = json_safe(summary)
    rows = [json_safe(r) for r in rows]
    with tempfile.TemporaryDirectory(prefix="sonosynth-evaluate-") as tmp:
        files = _tables(rows, Path(tmp))
        files += plots(rows, worst, Path(tmp)) if rows else []
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
        files.append(Path(tmp) / "summary.json")
        for path in files:
            storage.put_file(path.name, path)
        tracking = _track(cfg, summary, files)
    return _report(cfg, storage.url(""), summary, [p.name for p in files], tracking)


def _track(cfg: EvaluateConfig, summary: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    def numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
        return {prefix + k: float(v) for k, v in d.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}

    metrics = numbers(summary)
    for cohort, figures in summary["by_cohort"].items():
        metrics.update(numbers(figures, f"{cohort}/"))
    return track(cfg, metrics, files, {"sonosynth.dataset": cfg.dataset})


def _report(cfg: EvaluateConfig, out: str, summary: dict[str, Any], names: list[str],
            tracking: dict[str, Any]) -> Report:
    n, missing = summary["n_images"], summary["missing_predictions"]
    lines = [f"scored {n} images of {cfg.dataset} (split {cfg.split or 'all'}) with {cfg.box_draws} box draws",
             f"  Dice {_fmt(summary['dice_mean'])} (box baseline {_fmt(summary['box_baseline_dice_mean'])}), "
             f"IoU {_fmt(summary['iou_mean'])}, HD95 {_fmt(summary['hd95_px_mean'])} px, "
             f"HC error {_fmt(summary['hc_abs_err_px_mean'])} px"]
    lines += [f"  {c}: {f['n_images']} images, Dice {_fmt(f['dice_mean'])}" for c, f in summary["by_cohort"].items()]
    if missing:
        shown = ", ".join(summary["missing_prediction_keys"][:5])
        lines.append(f"  WARNING: {missing} images have no prediction ({shown}{' ...' if missing > 5 else ''}); "
                     f"expected <sample key>.png in {cfg.predictions or 'the predictor'}")
    if tracking.get("offline"):
        lines.append("warning: MLflow was unreachable; see tracking-offline/ and `sonosynth tracking-replay`")
    failed = None
    if n == 0:
        failed = (f"no image was scored ({missing} without a prediction, {summary['skipped_no_mask']} without a "
                  f"mask); check the split and that predictions are named <sample key>.png")
    elif missing and cfg.fail_on_missing:
        failed = f"{missing} images have no prediction and fail_on_missing is on"
    base = out.rstrip("/")
    return Report(stage="evaluate", out=out, text="\n".join(lines), failed=failed, tracking=tracking,
                  figures={k: v for k, v in summary.items() if k != "missing_prediction_keys"},
                  outputs={name.rsplit(".", 1)[0] if name != "per_image.csv" else "per_image_csv": f"{base}/{name}"
                           for name in names})


__all__ = ["EvaluateConfig", "FolderPredictions", "MissingPrediction", "PredictFn", "model_predictor", "run"]
