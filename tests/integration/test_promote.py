"""Champion/challenger promotion against a real MLflow server (HTTP, served artifacts).

Three versions of one registered model are scored by the real evaluate stage on the same
phantom dataset: each version's files are a folder of predicted masks (dilated, eroded,
exact), so their Dice is known in advance and the decisions are certain. The promote stage
downloads each version (``evaluation.pass_as: folder``) and hands it to evaluate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from sonosynth.infra.config import ConfigError, build
from sonosynth.infra.model_registry import Registry
from sonosynth.launch.promote import PromoteConfig, run

pytestmark = pytest.mark.integration
NAME = "sonosynth-promote-test"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, make_phantom_dataset) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("promote") / "ds", 8, ["brain"], size=64)


def write_predictions(dataset: Path, dest: Path, how: str) -> Path:
    from sonosynth.datasets.reader import DatasetReader
    from sonosynth.datasets.records import encode_png

    dest.mkdir(parents=True)
    for s in DatasetReader(str(dataset), distributed=False).samples():
        mask = s.mask > 127
        if how == "dilated":
            mask = ndimage.binary_dilation(mask, iterations=2)
        elif how == "eroded":
            mask = ndimage.binary_erosion(mask, iterations=6)
        (dest / f"{s.key}.png").write_bytes(encode_png(mask.astype(np.uint8) * 255))
    return dest


def register(client, folder: Path) -> str:
    exp = client.get_experiment_by_name("promote-test-models")
    exp_id = exp.experiment_id if exp else client.create_experiment("promote-test-models")
    run_id = client.create_run(exp_id).info.run_id
    client.log_artifacts(run_id, str(folder), "model")
    client.set_terminated(run_id)
    try:
        client.get_registered_model(NAME)
    except Exception:  # noqa: BLE001
        client.create_registered_model(NAME)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return str(client.create_model_version(NAME, source, run_id=run_id).version)


def promote_version(mlflow_url: str, dataset: Path, out: Path, version: str):
    cfg = build(PromoteConfig, {
        "out": str(out), "model": NAME, "version": version,
        "evaluation": {"stage": "evaluate", "field": "predictions", "pass_as": "folder",
                       "datasets": [str(dataset)], "split": None, "set": {"box_draws": 1, "worst_cases": 0}},
        "rules": {"metric": "dice_mean", "margin": 0.0, "per_cohort": True, "tolerance": 0.01},
        "tracking": {"uri": mlflow_url}, "progress": False})
    return run(cfg)


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("sonosynth")), *args],
                          capture_output=True, text=True, timeout=120)


def test_first_champion_worse_refused_better_promoted_and_rollback(mlflow_url, dataset, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_url)
    v1 = register(client, write_predictions(dataset, tmp_path / "p1", "dilated"))
    v2 = register(client, write_predictions(dataset, tmp_path / "p2", "eroded"))
    v3 = register(client, write_predictions(dataset, tmp_path / "p3", "exact"))

    first = promote_version(mlflow_url, dataset, tmp_path / "promote-1", v1)
    assert first.figures["decision"] == "first" and champion(client) == v1
    tags = client.get_model_version(NAME, v1).tags
    assert tags["sonosynth.decision"] == "first" and 0.5 < float(tags["sonosynth.challenger_dice_mean"]) < 1

    worse = promote_version(mlflow_url, dataset, tmp_path / "promote-2", v2)
    assert worse.figures["decision"] == "refused" and champion(client) == v1
    assert client.get_model_version_by_alias(NAME, "challenger").version == v2
    tags = client.get_model_version(NAME, v2).tags
    assert tags["sonosynth.decision"] == "refused" and tags["sonosynth.compared_with"] == v1
    assert float(tags["sonosynth.challenger_dice_mean"]) < float(tags["sonosynth.champion_dice_mean"])
    assert "sonosynth.champion_dice_mean/phantom" in tags and "dice_mean" in tags["sonosynth.reason"]
    decision_run = client.get_run(tags["sonosynth.decision_run"])  # the refusal is in the promote run too
    assert decision_run.data.tags["sonosynth.decision"] == "refused"
    assert decision_run.data.metrics["challenger/dice_mean"] < decision_run.data.metrics["champion/dice_mean"]
    assert decision_run.data.metrics["promoted"] == 0.0
    saved = json.loads((tmp_path / "promote-2" / "decision.json").read_text())
    assert saved["decision"] == "refused" and saved["champion"]["overall"]["dice_mean"] > 0.5
    evaluations = client.search_runs([decision_run.info.experiment_id],
                                     f"tags.`mlflow.parentRunId` = '{decision_run.info.run_id}'")
    assert sorted(r.data.tags["sonosynth.promote_role"] for r in evaluations) == ["challenger", "champion"]

    better = promote_version(mlflow_url, dataset, tmp_path / "promote-3", v3)
    assert better.figures["decision"] == "promoted" and champion(client) == v3
    assert client.get_model_version_by_alias(NAME, "previous_champion").version == v1
    assert better.figures["challenger"]["overall"]["dice_mean"] == pytest.approx(1.0)

    res = cli("champion", "rollback", NAME, "--uri", mlflow_url)
    assert res.returncode == 0, res.stderr
    assert champion(client) == v1 and client.get_model_version(NAME, v3).tags["sonosynth.decision"] == "rolled_back"

    res = cli("champion", "set", NAME, "--version", v2, "--uri", mlflow_url, "--reason", "hotfix")
    assert res.returncode == 0, res.stderr
    res = cli("champion", "show", NAME, "--uri", mlflow_url)
    assert res.returncode == 0 and f"champion:          version {v2}" in res.stdout, res.stderr
    assert f"previous_champion: version {v1}" in res.stdout and "hotfix" in res.stdout
    assert champion(client) == v2 and client.get_model_version(NAME, v2).tags["sonosynth.decision"] == "manual"
    assert Registry(mlflow_url).rollback(NAME).champion_after == v1 == champion(client)
    res = cli("champion", "rollback", NAME, "--uri", mlflow_url)
    assert res.returncode == 2 and "no previous champion" in res.stderr
    with pytest.raises(ConfigError, match="has no version 99"):
        Registry(mlflow_url).set_champion(NAME, "99")
