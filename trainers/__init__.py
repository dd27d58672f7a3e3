"""Model builders and the distributed training engine (Ray Train + DeepSpeed), shared by the
LoRA, SAM and classifier recipes.

``config`` (EngineConfig, TrainStageConfig), ``task`` (the ``TrainTask`` contract), ``tasks``
(the task registry), ``batching`` (data order and loading), ``engine`` (the per-rank loop),
``launcher`` (``train(cfg)``: the driver), ``checkpoint``, ``optim``, ``registry`` (fetching a
model folder from a path, s3:// or MLflow); ``diffusion/`` holds the Stable Diffusion LoRA and
the sampler, ``sam/`` and ``classifier/`` their models and tasks, ``evaluation/`` the metrics.

The trained models load back through one function each, importable from here without
importing torch up front: ``load_sam_model(uri)`` and ``load_classifier(uri)``.
"""

_LAZY = {
    "load_sam_model": "sonosynth.trainers.sam.models",
    "load_classifier": "sonosynth.trainers.classifier",
    "fetch_model_folder": "sonosynth.infra.model_registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sonosynth.trainers' has no attribute {name!r}")
