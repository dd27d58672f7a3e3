"""The quality stage end to end on small datasets (launch/quality/stage.py): tiny features, a predictions folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.manifest import manifest_row, write_manifest
from sonosynth.datasets.reader import DatasetReader
from sonosynth.datasets.records import Sample
from sonosynth.datasets.shards import publish_shard, shard_key
from sonosynth.infra.config import ConfigError, build
from sonosynth.infra.stage import UsageError
from sonosynth.infra.storage import open_storage
from sonosynth.launch.quality.stage import QualityConfig, run

KEYS = ("n_real", "n_synthetic", "n_compared", "fid", "fid_ci", "fid_real_vs_real", "fid_real_vs_real_ci",
        "fid_ratio", "kid_mean", "kid_std", "kid_ci", "kid_real_vs_real_mean", "kid_real_vs_real_std", "precision",
        "recall", "density", "coverage", "precision_ci", "coverage_real_vs_real", "density_real_vs_real_ci",
        "label_fidelity_dice_mean", "label_fidelity_dice_ci", "label_fidelity_dice_mean_real", "shape_distance",
        "shape_stats", "features", "gate")


def noise_dataset(folder: Path, num: int, size: int = 64) -> str:
    """A dataset of uniform noise images without masks, written like ingest writes one."""
    rng = np.random.default_rng(7)
    storage = open_storage(str(folder))
    samples = [Sample(f"noise-{i:04d}", rng.integers(0, 256, (size, size), dtype=np.uint8), None,
                      {"cohort": "noise", "source": "synthetic", "split": "train", "has_mask": False,
                       "width": size, "height": size}) for i in range(num)]
    key = shard_key("noise", 0)
    publish_shard(storage, key, samples)
    write_manifest(storage, [manifest_row(s, key) for s in samples])
    return str(folder)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("quality")
    cfg = build(IngestConfig, {"out": str(root / "real"), "progress": False, "cohort": {
        "name": "phantom", "phantom": {"num": 16, "height": 64, "width": 64, "planes": ["brain"], "seed": 0}}})
    assert run_ingest(cfg, progress=False).ingested == 16
    masks = root / "masks"
    masks.mkdir()
    for sample in DatasetReader(str(root / "real"), distributed=False).samples():
        Image.fromarray(sample.mask).save(masks / f"{sample.key}.png")
    return {"real": str(root / "real"), "noise": noise_dataset(root / "noise", 8), "masks": str(masks)}


def _cfg(sets, out: Path, synthetic: str, **extra) -> QualityConfig:
    return build(QualityConfig, {"real": {"dataset": sets["real"]}, "synthetic": {"dataset": synthetic},
                                 "out": str(out), "bootstrap": 30, "progress": False,
                                 "metrics": {"kid_subsets": 20}, "tracking": {"enabled": False}, **extra})


def test_noise_is_far_from_real_and_real_pairs_score_their_own_masks(sets, tmp_path):
    cfg = _cfg(sets, tmp_path / "q", sets["noise"], fidelity={"predictions": sets["masks"]},
               gate={"fid_ratio_max": 3.0})
    report = run(cfg)
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert set(KEYS) <= set(summary) and report.failed is None
    assert summary["n_real"] == 16 and summary["n_synthetic"] == 8 and summary["n_compared"] == 8
    # pure noise: far above what two real halves of the same size give
    assert summary["fid"] > 20 * summary["fid_real_vs_real"]
    assert summary["fid_ci"][0] > summary["fid_real_vs_real_ci"][1]
    assert summary["precision"] == 0.0 and summary["coverage"] == 0.0 and summary["precision_real_vs_real"] > 0.5
    assert summary["fid_ratio"] == pytest.approx(summary["fid"] / summary["fid_real_vs_real"])
    # the real pairs scored by their own masks; the noise has no masks to score
    assert summary["label_fidelity_dice_mean_real"] == 1.0 and summary["label_fidelity_n_real"] == 16
    assert summary["label_fidelity_dice_mean"] is None and summary["label_fidelity_n"] == 0
    assert summary["shape_distance"] is None and summary["shape_stats"]["area_frac"]["real_mean"] > 0
    assert not summary["gate"]["passed"] and summary["gate"]["checks"][0]["name"] == "fid_ratio_max"
    assert f"gate failed: {summary['gate']['decision']}" in report.text
    assert "below the feature dimension 32" in " ".join(summary["warnings"]) and summary["fid_reliable"] is False
    assert summary["features"]["kind"] == "tiny" and summary["features"]["dim"] == 32
    rows = pq.read_table(tmp_path / "q" / "per_image.parquet").to_pylist()
    assert len(rows) == 24 and sum(r["set"] == "synthetic" for r in rows) == 8
    assert {r["role"] for r in rows if r["set"] == "real"} == {"real_a", "real_b"}
    assert all(r["label_fidelity_dice"] == 1.0 for r in rows if r["set"] == "real")
    for name in ("features_tsne.png", "worst_fidelity.png", "config.yaml", "job.json"):
        assert (tmp_path / "q" / name).is_file(), name
    assert set(report.outputs) >= {"summary", "per_image", "tsne", "worst"} and "shape_stats" not in report.figures
    assert report.figures["gate"] == summary["gate"]


def test_without_a_segmenter_label_fidelity_is_skipped_and_a_dice_limit_fails(sets, tmp_path):
    report = run(_cfg(sets, tmp_path / "q", sets["real"], bootstrap=0, gate={"label_fidelity_dice_min": 0.5}))
    s = report.figures
    assert s["label_fidelity"] == "skipped" and s["label_fidelity_dice_mean"] is None and s["fid_ci"] is None
    assert "label fidelity: skipped" in report.text and "worst" not in report.outputs
    assert not s["gate"]["passed"] and "no fidelity.model" in s["gate"]["decision"]
    assert s["shape_distance"] is not None and s["shape_distance"] < 0.5  # the real set against itself


def test_errors_name_the_fix(sets, tmp_path):
    with pytest.raises(UsageError, match="too few images to compare"):
        run(_cfg(sets, tmp_path / "few", sets["noise"], real={"dataset": sets["real"], "limit": 3}))
    with pytest.raises(ConfigError, match="cannot read the dataset"):
        run(_cfg(sets, tmp_path / "none", str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="no .png predictions"):
        run(_cfg(sets, tmp_path / "empty", sets["noise"], fidelity={"predictions": str(tmp_path)}))
