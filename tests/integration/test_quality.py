"""`sonosynth quality` as the CLI runs it (its flags, the recipe, the stage, the printed report; in this
process, to share the imports): a phantom real set against a second phantom set, tiny features, label
fidelity from a train-sam model folder (a tiny SAM), tracked on a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


def tiny_sam_folder(folder: Path, dataset: str) -> Path:
    """A model/ folder in the format train-sam exports (an untrained decoder on a tiny random SAM)."""
    import torch

    from sonosynth.infra.config import build
    from sonosynth.trainers.sam.models import SamModelConfig, build_sam
    from sonosynth.trainers.sam.train import SamTrainConfig, finetuned_payload

    folder.mkdir(parents=True)
    torch.save(finetuned_payload(build_sam(SamModelConfig(arch="tiny", seed=1)), "decoder"),
               folder / "sam_finetuned.pt")
    cfg = build(SamTrainConfig, {"out": "x", "model": {"arch": "tiny", "seed": 1},
                                 "data": {"sources": {"real": {"dataset": dataset}}, "image_size": 64}})
    (folder / "config.yaml").write_text(cfg.to_yaml())
    return folder


@pytest.fixture
def one_thread():
    """Tiny models on shared CPU cores: a tiny SAM's many small ops run ~100x slower on two busy intra-op
    threads than on one (the stage keeps whatever torch is set to)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quality_cli_on_phantom_sets(tmp_path, make_phantom_dataset, mlflow_url, capsys, one_thread):
    from mlflow import MlflowClient

    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.infra.config import build
    from sonosynth.launch.cli.stage_verbs import flag_values, run_stage
    from sonosynth.launch.stages import STAGES

    real = make_phantom_dataset(tmp_path / "real", 20, ["brain"], size=64)
    synthetic = tmp_path / "synthetic"
    run_ingest(build(IngestConfig, {"out": str(synthetic), "cohort": {"name": "phantom", "phantom": {
        "num": 12, "height": 80, "width": 64, "planes": ["brain"], "seed": 1}}}), progress=False)
    segmenter = tiny_sam_folder(tmp_path / "sam", str(real))
    out = tmp_path / "quality"
    stage = STAGES["quality"]
    flags, nulls = flag_values(stage, {"real": str(real), "synthetic": str(synthetic), "segmenter": str(segmenter),
                                       "out": str(out), "progress": False})
    run_stage(stage, "quality_tiny", flags, [*nulls, f"tracking.uri={mlflow_url}", "bootstrap=40",
                                             "gate.label_fidelity_dice_min=0.999"])  # no SystemExit: exit 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for key in ("n_real", "n_synthetic", "n_compared", "fid", "fid_ci", "fid_real_vs_real", "fid_real_vs_real_ci",
                "fid_ratio", "kid_mean", "kid_std", "kid_ci", "kid_real_vs_real_mean", "kid_real_vs_real_std",
                "precision", "recall", "density", "coverage", "recall_ci", "density_real_vs_real",
                "label_fidelity_dice_mean", "label_fidelity_dice_ci", "label_fidelity_dice_mean_real",
                "shape_distance", "shape_stats", "features", "gate"):
        assert key in summary, key
    assert (summary["n_real"], summary["n_synthetic"], summary["n_compared"]) == (20, 12, 10)
    assert summary["features"]["kind"] == "tiny" and summary["segmenter"]["model"] == str(segmenter)
    assert 0.0 <= summary["label_fidelity_dice_mean"] <= 1.0 and summary["label_fidelity_n"] == 12
    assert summary["label_fidelity_dice_ci"][0] <= summary["label_fidelity_dice_mean"] <= \
        summary["label_fidelity_dice_ci"][1]
    assert summary["label_fidelity_n_real"] == 20 and summary["shape_distance"] > 0
    # an untrained decoder cannot reach a Dice of 0.999: the gate fails, the stage still exits 0
    assert not summary["gate"]["passed"] and f"gate failed: {summary['gate']['decision']}" in printed
    rows = pq.read_table(out / "per_image.parquet").to_pylist()
    assert len(rows) == 32 and all(r["label_fidelity_dice"] is not None for r in rows)
    assert {"features_tsne.png", "worst_fidelity.png", "config.yaml"} <= {p.name for p in out.iterdir()}
    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("sonosynth-quality")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`sonosynth.out` = '{out}'")
    assert run.info.run_id in printed and run.data.params["features.kind"] == "tiny"
    metrics = run.data.metrics
    assert metrics["fid"] == pytest.approx(summary["fid"]) and metrics["gate_passed"] == 0.0
    assert metrics["label_fidelity_dice_mean"] == pytest.approx(summary["label_fidelity_dice_mean"])
    assert {"fid_ci_low", "fid_real_vs_real", "kid_mean", "coverage"} <= set(metrics)
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "per_image.parquet", "features_tsne.png", "worst_fidelity.png"} <= logged
