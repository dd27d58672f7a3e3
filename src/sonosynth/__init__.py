"""sonosynth: distributed diffusion-based synthetic data augmentation for fetal ultrasound.

Subpackages (mapped from the repository's top-level folders):
  sonosynth.datasets  cohort adapters, phantom data, mask geometry, shards, manifests, splits
  sonosynth.trainers  model builders and the distributed training engine
  sonosynth.launch    the `sonosynth` CLI, recipes, orchestration
  sonosynth.infra     storage, tracking, configuration, logging
"""

__version__ = "0.1.0"
