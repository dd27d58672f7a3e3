"""A lineage on disk and in a real MLflow server: tiny fake versions with the files the stages write.

``lineage_world`` registers a LoRA version whose folder sits beside the summary.json train-lora
writes, a synthetic set whose job.json and config.yaml are generate's, a real dataset, and SAM
versions whose lineage.json names their sources, as the engine exports them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class LineageWorld:
    """Fresh model names on the session's MLflow server and a folder for the datasets."""

    uri: str
    root: Path
    sam: str
    lora: str
    experiment_id: str

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri, registry_uri=self.uri)

    def register(self, name: str, lineage: dict) -> tuple[str, str]:
        """A version of ``name`` from a new run whose model/ holds ``lineage``: (version, run id).
        Three requests (the server is shared by the session and each costs a round trip)."""
        client = self.client
        run = client.create_run(self.experiment_id).info
        path = self.root / f"upload-{run.run_id}" / "lineage.json"
        path.parent.mkdir()
        path.write_text(json.dumps(lineage))
        client.log_artifact(run.run_id, str(path), "model")
        version = client.create_model_version(name, f"{run.artifact_uri}/model", run_id=run.run_id).version
        return str(version), run.run_id

    def lora_version(self, tag: str) -> tuple[str, Path]:
        """A registered LoRA version and its train-lora folder (model/ beside summary.json naming only its run)."""
        version, run_id = self.register(self.lora, {"base_model": "tiny-sd", "dataset": str(self.real())})
        stage = self.root / f"lora-{tag}"
        (stage / "model").mkdir(parents=True)
        (stage / "summary.json").write_text(json.dumps({"mlflow": {"run_id": run_id, "version": None}}))
        return version, stage / "model"

    def dataset(self, name: str, stage: str, config: str = "") -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        (path / "job.json").write_text(json.dumps({"stage": stage, "identity": {}}))
        (path / "config.yaml").write_text(config)
        return path

    def real(self) -> Path:
        return self.dataset("real", "ingest")

    def synthetic(self, name: str, lora: str | Path | None) -> Path:
        return self.dataset(name, "generate", f"out: x\nsampler:\n  lora: {lora or 'null'}\n  steps: 10\n")

    def sam_version(self, *synthetic: Path) -> str:
        sources = {"real": {"dataset": str(self.real()), "split": "train"}}
        sources.update({f"synthetic{i}": {"dataset": str(p), "split": "train"} for i, p in enumerate(synthetic)})
        return self.register(self.sam, {"base_model": "tiny-sam-seed0", "sources": sources})[0]

    def champion(self, name: str) -> str | None:
        from sonosynth.infra.model_registry import CHAMPION, Registry

        return Registry(self.uri).alias(name, CHAMPION)

    def tags(self, name: str, version: str) -> dict[str, str]:
        return self.client.get_model_version(name, version).tags


@pytest.fixture
def lineage_world(mlflow_url, tmp_path) -> LineageWorld:
    from mlflow import MlflowClient

    client, tag = MlflowClient(mlflow_url, registry_uri=mlflow_url), uuid.uuid4().hex[:8]
    for name in (f"sam-{tag}", f"lora-{tag}"):
        client.create_registered_model(name)
    exp = client.get_experiment_by_name("lineage-test-models")
    exp_id = exp.experiment_id if exp else client.create_experiment("lineage-test-models")
    return LineageWorld(mlflow_url, tmp_path, f"sam-{tag}", f"lora-{tag}", exp_id)
