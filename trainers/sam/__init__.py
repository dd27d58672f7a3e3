"""Segment Anything (SAM): model builders (real ViT-B/L/H from a local ``.pth``, or a tiny model
from config) and the forward pieces training and evaluation call (``models``); the
``train-sam`` stage (``train``: ``SamTrainConfig``, ``SamTask``); and ``load_sam_model``, which
loads a fine-tuned SAM back from its folder, ``s3://`` or MLflow (``models:/sonosynth-sam@champion``).

Imports are lazy: ``import sonosynth.trainers.sam`` does not load torch."""

from __future__ import annotations

from typing import Any

__all__ = ["load_sam_model", "predict_masks"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sonosynth.trainers.sam import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
