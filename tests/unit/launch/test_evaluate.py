from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.reader import DatasetReader
from sonosynth.infra.config import ConfigError, build
from sonosynth.launch.evaluate.segmentation import EvaluateConfig, run


def _no_nan(text: str) -> dict:
    def refuse(name):
        raise AssertionError(f"{name} in summary.json")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[str, list]:
    """A phantom dataset (two planes, half of it in test) and its test samples."""
    out = tmp_path_factory.mktemp("eval") / "ds"
    cfg = build(IngestConfig, {"out": str(out), "progress": False, "splits": {"test": 0.5, "val": 0.0},
                               "cohort": {"name": "phantom", "phantom": {
                                   "num": 12, "height": 96, "width": 128, "planes": ["brain", "abdomen"]}}})
    assert run_ingest(cfg, progress=False).ingested == 12
    samples = list(DatasetReader(str(out), split="test", distributed=False).samples())
    assert len(samples) >= 3 and all(s.mask is not None for s in samples)
    return str(out), samples


def _write(folder: Path, masks: dict[str, np.ndarray]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for key, mask in masks.items():
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(folder / f"{key}.png")
    return str(folder)


def _cfg(dataset: str, out: Path, **extra) -> EvaluateConfig:
    return build(EvaluateConfig, {"dataset": dataset, "out": str(out), "box_draws": 2, "progress": False,
                                  "tracking": {"enabled": False}, **extra})


def test_perfect_predictions_score_exactly_one(phantom, tmp_path):
    dataset, samples = phantom
    preds = _write(tmp_path / "pred", {s.key: s.mask for s in samples})
    report = run(_cfg(dataset, tmp_path / "ev", predictions=preds))
    assert report.failed is None
    summary = _no_nan((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_images"] == len(samples) and summary["dice_mean"] == 1.0 and summary["iou_mean"] == 1.0
    assert summary["hd95_px_mean"] == 0.0 and summary["hc_abs_err_px_mean"] == 0.0
    assert summary["hd95_mm_mean"] is None  # the phantom has no pixel size
    assert 0.5 < summary["box_baseline_dice_mean"] < 1.0
    assert summary["missing_predictions"] == 0 and summary["by_cohort"]["phantom"]["dice_mean"] == 1.0
    for name in ("per_image.parquet", "per_image.csv", "dice_distribution.png", "worst_cases.png",
                 "config.yaml", "job.json"):
        assert (tmp_path / "ev" / name).is_file(), name
    assert report.figures["dice_mean"] == 1.0 and report.outputs["summary"].endswith("summary.json")


def test_imperfect_and_missing_predictions(phantom, tmp_path):
    dataset, samples = phantom
    eroded = {s.key: ndimage.binary_erosion(s.mask > 0, iterations=2 + i) for i, s in enumerate(samples)}
    missing = samples[0].key
    small = samples[1].key  # written at half size: resized to the image, then scored
    preds = {k: m for k, m in eroded.items() if k != missing}
    preds[small] = np.asarray(Image.fromarray(eroded[small].astype(np.uint8) * 255).resize((64, 48)))
    report = run(_cfg(dataset, tmp_path / "ev", predictions=_write(tmp_path / "pred", preds), fail_on_missing=True))
    assert report.failed and "no prediction" in report.failed
    assert "1 images have no prediction" in report.text and missing in report.text
    summary = _no_nan((tmp_path / "ev" / "summary.json").read_text())
    assert summary["missing_predictions"] == 1 and summary["missing_prediction_keys"] == [missing]
    assert summary["n_images"] == len(samples) - 1 and summary["resized_predictions"] == 1
    table = pq.read_table(tmp_path / "ev" / "per_image.parquet").to_pylist()
    assert missing not in {r["key"] for r in table}
    for row in table:
        if row["key"] == small:
            continue
        gt, pred = next(s.mask > 0 for s in samples if s.key == row["key"]), eroded[row["key"]]
        assert row["dice"] == pytest.approx(2 * (gt & pred).sum() / (gt.sum() + pred.sum()), abs=1e-12)
        assert row["iou"] == pytest.approx((gt & pred).sum() / (gt | pred).sum(), abs=1e-12)
        assert row["hd95_px"] > 0 and row["box_draws"] == 2 and len(row["box_baseline_dice_by_draw"]) == 2
    assert summary["dice_mean"] == pytest.approx(np.mean([r["dice"] for r in table]))
    csv_header = (tmp_path / "ev" / "per_image.csv").read_text().splitlines()[0]
    assert '"dice"' in csv_header and "by_draw" not in csv_header


def test_an_injected_predictor_gets_the_box_draws(phantom, tmp_path):
    from sonosynth.trainers.sam.models import SamModelConfig, build_sam, predict_masks

    dataset, samples = phantom
    sam = build_sam(SamModelConfig(arch="tiny"))
    seen = []

    def predict(sample, boxes):
        seen.append(boxes)
        return predict_masks(sam, sample.image, boxes)

    cfg = _cfg(dataset, tmp_path / "ev", model="models:/sonosynth-sam@champion", box_draws=3)
    report = run(cfg, predict_fn=predict)
    assert report.failed is None and len(seen) == len(samples) and all(b.shape == (3, 4) for b in seen)
    summary = _no_nan((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_images"] == len(samples) and 0.0 <= summary["dice_mean"] <= 1.0
    # the same seed draws the same boxes
    again = []
    run(cfg, predict_fn=lambda s, b: again.append(b) or np.zeros(s.image.shape, bool))
    assert all(np.array_equal(a, b) for a, b in zip(seen, again))


def test_a_train_sam_model_folder_is_evaluated_through_its_predictor(phantom, tmp_path):
    """model=FOLDER: the SAM train-sam exports, loaded once and asked with every box draw."""
    import torch

    from sonosynth.trainers.sam.models import SamModelConfig, build_sam, load_sam_model, predict_masks
    from sonosynth.trainers.sam.train import SamTrainConfig, finetuned_payload

    dataset, samples = phantom
    sam = build_sam(SamModelConfig(arch="tiny", seed=2))
    folder = tmp_path / "model"
    folder.mkdir()
    payload = finetuned_payload(sam, "decoder")  # what train-sam writes for an untrained decoder
    torch.save(payload, folder / "sam_finetuned.pt")
    cfg = build(SamTrainConfig, {"out": "x", "model": {"arch": "tiny", "seed": 2},
                                 "data": {"sources": {"real": {"dataset": dataset}}, "image_size": 64}})
    (folder / "config.yaml").write_text(cfg.to_yaml())
    report = run(_cfg(dataset, tmp_path / "ev", model=str(folder), worst_cases=0))
    assert report.failed is None and report.figures["n_images"] == len(samples)
    # the figures are the loaded model's predictions, at the size it was trained at (64 px)
    from sonosynth.trainers.evaluation.segmentation import draw_boxes, score_image
    from sonosynth.infra.seeds import derive_seed

    loaded = load_sam_model(str(folder))
    s = samples[0]
    boxes = draw_boxes(s.mask > 127, 2, 19, np.random.default_rng(derive_seed("evaluate-box", 0, s.key)))
    want = score_image(s.mask > 127, predict_masks(loaded, s.image, boxes, work_size=64), boxes)["dice"]
    table = {r["key"]: r for r in pq.read_table(tmp_path / "ev" / "per_image.parquet").to_pylist()}
    assert table[s.key]["dice"] == pytest.approx(want)


def test_config_and_output_errors_name_the_fix(phantom, tmp_path):
    dataset, samples = phantom
    with pytest.raises(ConfigError, match="predictions=FOLDER"):
        build(EvaluateConfig, {"dataset": dataset})
    with pytest.raises(ConfigError, match="cannot fetch SAM model models:/sonosynth-sam/1"):
        run(_cfg(dataset, tmp_path / "ev", model="models:/sonosynth-sam/1",
                 tracking={"uri": f"sqlite:///{tmp_path / 'empty.db'}"}))
    with pytest.raises(ConfigError, match="not a folder"):
        run(_cfg(dataset, tmp_path / "ev", model=str(tmp_path / "no-model")))
    with pytest.raises(ConfigError, match="no .png predictions"):
        run(_cfg(dataset, tmp_path / "ev", predictions=str(tmp_path)))
    preds = _write(tmp_path / "pred", {s.key: s.mask for s in samples})
    run(_cfg(dataset, tmp_path / "ev", predictions=preds))
    with pytest.raises(ConfigError, match="different evaluate job"):
        run(_cfg(dataset, tmp_path / "ev", predictions=preds, seed=1))
    report = run(_cfg(dataset, tmp_path / "ev2", predictions=_write(tmp_path / "other", {"nobody": samples[0].mask})))
    assert report.failed and "no image was scored" in report.failed


def test_metrics_and_plots_are_logged_to_mlflow(phantom, tmp_path):
    from mlflow import MlflowClient

    dataset, samples = phantom
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    preds = _write(tmp_path / "pred", {s.key: s.mask for s in samples})
    report = run(_cfg(dataset, tmp_path / "ev", predictions=preds, tracking={"uri": uri}))
    client = MlflowClient(uri)
    run_id = report.tracking["run_id"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["dice_mean"] == 1.0 and metrics["phantom/dice_mean"] == 1.0
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "per_image.parquet", "dice_distribution.png", "worst_cases.png"} <= logged


def test_real_hc18_sample(shared_data, tmp_path):
    out = tmp_path / "hc18"
    run_ingest(build(IngestConfig, {"out": str(out), "progress": False,
                                    "cohort": {"name": "hc18", "src": str(shared_data / "hc18_sample")}}),
               progress=False)
    samples = list(DatasetReader(str(out), split="test", distributed=False).samples())
    assert samples and all(s.image.shape == (540, 800) for s in samples)
    eroded = {s.key: ndimage.binary_erosion(s.mask > 0, iterations=4) for s in samples}
    run(_cfg(str(out), tmp_path / "ev", predictions=_write(tmp_path / "pred", eroded)))
    summary = _no_nan((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_images"] == len(samples) and summary["by_cohort"]["hc18"]["n_images"] == len(samples)
    assert 0.95 < summary["dice_mean"] < 1.0 and 3.5 <= summary["hd95_px_mean"] <= 5.0
    # 4 px of erosion shortens the head circumference by about 2 * pi * 4 px
    assert summary["hc_abs_err_px_mean"] == pytest.approx(2 * np.pi * 4, rel=0.1)
    assert 0.7 < summary["box_baseline_dice_mean"] < 0.99
