"""Fetal plane classification (FU-LoRA protocol, corrected): ``models`` (backbones from
transformers and MONAI, no torchvision), ``data`` (the job's label map, the paper's
augmentation, class-balanced picks), ``sources`` (the training mix and the validation split),
``train`` (the ``train-classifier`` stage on the shared engine) and ``predict``
(``load_classifier``). Metrics live in ``sonosynth.trainers.evaluation.classification``."""

from __future__ import annotations

from typing import Any

__all__ = ["Classifier", "load_classifier"]


def __getattr__(name: str) -> Any:  # lazy: importing a submodule does not load torch models
    if name in __all__:
        from sonosynth.trainers.classifier import predict

        return getattr(predict, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
