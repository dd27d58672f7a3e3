"""Load a trained plane classifier back, from anywhere it was written, and predict with it.

``load_classifier(uri, tracking_uri=None)`` takes the ``model/`` folder written by
``train-classifier`` (local or ``s3://``), or an MLflow URI: ``models:/sonosynth-classifier/3``,
``models:/sonosynth-classifier@champion`` or ``runs:/<run id>/model``. It returns a
``Classifier``: the model in eval mode, its label map, the eval transform it was validated
with (resize the longer side, pad to a square, the training normalisation) and
``predict_proba(images) -> [N, K]`` softmax probabilities in the label map's order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sonosynth.infra.config import ConfigError
from sonosynth.infra.model_registry import fetch_model_folder

CLASSIFIER_FILE = "classifier.json"


@dataclass
class Classifier:
    """A trained classifier ready to predict."""

    model: Any
    """The ImageClassifier (eval mode): forward(pixel_values [B,3,S,S]) -> logits [B,K]."""
    labels: list[str]
    """Class names in the order of the logits and probabilities."""
    transform: Any
    """uint8 image (HxW, 1xHxW, RGB) -> normalised [3,S,S], as in validation."""
    folder: Path
    """Local folder the model was read from."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """The training job's lineage.json (data, labels, selection)."""
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def predict_proba(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities [N, K] of uint8 images (any size; grayscale or RGB)."""
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.transform(im) for im in images[i:i + batch_size]]).to(self.device)
            out.append(torch.softmax(self.model(x).float(), dim=1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, images: Sequence[Any], batch_size: int = 32) -> list[str]:
        """The most probable class name of each image."""
        return [self.labels[i] for i in self.predict_proba(images, batch_size).argmax(axis=1)]


def load_classifier(uri: str | Path, tracking_uri: str | None = None, device: str | None = None,
                    storage=None) -> Classifier:
    """The classifier at ``uri``: a model/ folder (local or s3://) or an MLflow models:/ or runs:/ URI
    (``tracking_uri``: the MLflow server or store; None: $MLFLOW_TRACKING_URI). ``storage``: the
    StorageConfig of s3://."""
    from sonosynth.trainers.classifier.data import ClassifierTransform
    from sonosynth.trainers.classifier.models import ClassifierModelConfig, build_classifier

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = fetch_model_folder(str(uri), tracking_uri, what="classifier", storage=storage,
                                hint="the model/ folder written by `sonosynth train-classifier`")
    info_path = folder / CLASSIFIER_FILE
    if not info_path.is_file():
        nested = folder / "model" / CLASSIFIER_FILE  # a job's output folder, or runs:/<id> without /model
        if nested.is_file():
            folder, info_path = folder / "model", nested
        else:
            raise ConfigError(f"{uri} holds no {CLASSIFIER_FILE}: point at the model/ folder written by "
                              "`sonosynth train-classifier`, or at its MLflow model (models:/sonosynth-classifier/N)")
    info = json.loads(info_path.read_text())
    cfg = ClassifierModelConfig(backbone=info["backbone"], pretrained=str(folder), image_size=info["image_size"],
                                pixel_mean=info["pixel_mean"], pixel_std=info["pixel_std"])
    model = build_classifier(cfg, info["labels"])
    dev = torch.device(device or "cpu")
    model.to(dev).eval()
    lineage_path = folder / "lineage.json"
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else {}
    transform = ClassifierTransform(info["image_size"], info["pixel_mean"], info["pixel_std"])
    return Classifier(model, list(info["labels"]), transform, folder, lineage, dev)
