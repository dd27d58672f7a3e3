"""Evaluation metrics shared by the stages: ``segmentation`` (Dice, IoU, HD95, head
circumference, the box-prompt baseline; ``sonosynth evaluate`` and train-sam) and
``classification`` (plane classification metrics)."""
