"""Fetal plane classification (FU-LoRA protocol, corrected): ``models`` (backbones from
transformers and MONAI, no torchvision), ``data`` (the job's label map, the paper's
augmentation, class-balanced picks). Metrics live in ``sonosynth.trainers.evaluation.classification``."""
