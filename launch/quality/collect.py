"""One pass over a dataset: features of the chosen images, label fidelity and shape statistics of every pair.

Each sample is decoded once: the images the comparison uses go through the feature extractor
(in batches), and every sample with a mask gets its shape statistics and, with a segmenter, its
label-fidelity Dice (the worst pairs are kept as overlays for worst_fidelity.png).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.storage import StorageConfig
from sonosynth.launch.quality.features import FeatureExtractor
from sonosynth.launch.quality.fidelity import Predictor, shape_stats
from sonosynth.launch.quality.plots import WorstEntry


@dataclass
class SetPass:
    """What one pass over a set gave."""

    name: str
    """real or synthetic."""
    features: dict[str, np.ndarray] = field(default_factory=dict)
    """Feature vector of each chosen key."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One per-image row per sample read."""
    dice: list[float] = field(default_factory=list)
    """Label-fidelity Dice of each scored pair."""
    missing: list[str] = field(default_factory=list)
    """Keys of pairs the predictions folder has no mask for."""
    empty_masks: int = 0
    """Pairs whose mask is empty (no box to prompt with: not scored)."""
    worst: list[WorstEntry] = field(default_factory=list)
    """Heap of the lowest-Dice pairs, as overlays."""


def read_set(name: str, uri: str, keys: list[str], roles: dict[str, str], extractor: FeatureExtractor,
             predictor: Predictor | None, *, worst_cases: int, jitter_px: int, seed: int, storage: StorageConfig,
             progress: bool) -> SetPass:
    """Read ``keys`` of dataset ``uri`` once; ``roles`` maps the keys whose features are wanted to
    their role in the comparison (real_a, real_b, synthetic)."""
    from sonosynth.datasets.augment import box_from_mask
    from sonosynth.datasets.reader import DatasetReader
    from sonosynth.launch.evaluate.segmentation import MissingPrediction
    from sonosynth.trainers.evaluation.segmentation import dice_iou, overlay

    out = SetPass(name)
    worst = out.worst
    reader = DatasetReader(uri, keys=keys, storage=storage, distributed=False)
    samples = reader.samples()
    if progress:
        from sonosynth.infra.progress import track

        samples = track(samples, len(reader), f"quality {name}", "image")
    batch_keys: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        for key, vector in zip(batch_keys, extractor(batch)):
            out.features[key] = vector
        batch_keys.clear()
        batch.clear()

    for sample in samples:
        meta = sample.meta
        row: dict[str, Any] = {"key": sample.key, "set": name, "role": roles.get(sample.key),
                               "cohort": meta.get("cohort"), "plane": meta.get("plane"),
                               "has_mask": sample.mask is not None, "label_fidelity_dice": None}
        if sample.key in roles:
            batch_keys.append(sample.key)
            batch.append(sample.image)
            if len(batch) >= extractor.batch_size:
                flush()
        if sample.mask is not None:
            gt = sample.mask > 127
            row.update(shape_stats(sample.mask))
            rng = np.random.default_rng(derive_seed("quality-box", seed, sample.key))
            box = box_from_mask(gt, jitter_px, rng) if predictor is not None else None
            if predictor is not None and box is None:
                out.empty_masks += 1
            elif box is not None:
                try:
                    pred = np.asarray(predictor(sample, box[None])) > 0
                except MissingPrediction:
                    out.missing.append(sample.key)
                    pred = None
                if pred is not None:
                    dice = dice_iou(pred, gt)[0]
                    row["label_fidelity_dice"] = dice
                    out.dice.append(dice)
                    if worst_cases and (len(worst) < worst_cases or -dice > worst[0][0]):
                        entry = (-dice, len(out.rows), sample.key, name, overlay(sample.image, gt, pred, box))
                        (heapq.heappush if len(worst) < worst_cases else heapq.heappushpop)(worst, entry)
        out.rows.append(row)
    if batch:
        flush()
    return out
