"""Label fidelity (does the mask of an image+mask pair match what a segmenter sees in the image?) and
mask-shape statistics of a set, compared with the real ones.

Label fidelity: the segmenter is prompted with the box of the pair's own mask (``box_from_mask``,
jitter 0 by default: the tight box) and its prediction is scored against that mask with Dice
(``trainers/evaluation/segmentation.dice_iou``, MONAI's formula). A predictions folder (evaluate's
``FolderPredictions``) stands in for a model.

Shape statistics of a mask: area fraction, axis ratio (minor / major semi-axis), centre x and y
(fractions of the width and height) and the angle of the major axis (degrees in [0, 180)) of the
ellipse fitted to its largest region (``fit_head``). The distance of a statistic between the sets
is scipy's 1-D Wasserstein distance divided by the real set's std; the angle is axial (0 and 180
degrees are one direction), so both sets are first turned so that the real set's mean axis lies at
90 degrees, away from the cut. ``shape_distance`` is the mean over the statistics.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from sonosynth.datasets.records import Sample
from sonosynth.infra.config import ConfigError
from sonosynth.infra.storage import StorageConfig
from sonosynth.launch.quality.config import FidelityConfig

SHAPE_STATS = ("area_frac", "axis_ratio", "centre_x", "centre_y", "angle_deg")
Predictor = Callable[[Sample, np.ndarray], np.ndarray]


def build_predictor(cfg: FidelityConfig, storage: StorageConfig, tracking_uri: str | None = None,
                    device: str | None = None) -> tuple[Predictor, dict[str, Any]] | None:
    """(predict(sample, boxes [1, 4]) -> mask, identity) of ``cfg``; None without a segmenter."""
    if cfg.predictions:
        from sonosynth.launch.evaluate.segmentation import FolderPredictions

        return FolderPredictions(cfg.predictions, storage, cfg.threshold), {"predictions": cfg.predictions}
    if not cfg.model:
        return None
    import torch

    from sonosynth.infra.model_registry import is_mlflow_uri, model_folder
    from sonosynth.trainers.sam.models import WEIGHTS_FILE, load_sam_model, predict_masks, sha256_file

    with model_folder(cfg.model, tracking_uri if is_mlflow_uri(cfg.model) else None, what="SAM model",
                      required=WEIGHTS_FILE, storage=storage,
                      hint="the model/ folder written by `sonosynth train-sam`, or its MLflow model") as folder:
        try:
            sam = load_sam_model(str(folder), base_checkpoint=cfg.base_checkpoint,
                                 device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except FileNotFoundError as err:
            raise ConfigError(f"fidelity.model={cfg.model!r}: {err}") from None
        digest = sha256_file(folder / WEIGHTS_FILE)

    def predict(sample: Sample, boxes: np.ndarray) -> np.ndarray:
        return predict_masks(sam, sample.image, boxes)[0]

    return predict, {"model": cfg.model, "sha256": digest}


def shape_stats(mask: np.ndarray) -> dict[str, float | None]:
    """The shape statistics of one mask (None where no ellipse fits, e.g. an empty mask)."""
    from sonosynth.trainers.evaluation.segmentation import fit_head

    binary = np.asarray(mask) > 127
    h, w = binary.shape
    stats: dict[str, float | None] = {"area_frac": float(binary.mean())}
    e = fit_head(binary)
    if e is None:
        return {**stats, **{name: None for name in SHAPE_STATS[1:]}}
    major, minor = max(e.a, e.b), min(e.a, e.b)
    theta = e.theta if e.a >= e.b else e.theta + math.pi / 2
    stats.update(axis_ratio=minor / major, centre_x=e.cx / w, centre_y=e.cy / h,
                 angle_deg=math.degrees(theta) % 180.0)
    return stats


def _axial_mean(angles_deg: np.ndarray) -> float:
    doubled = np.radians(2 * angles_deg)
    return math.degrees(math.atan2(np.sin(doubled).mean(), np.cos(doubled).mean())) / 2 % 180.0


def shape_distances(real: list[dict[str, Any]], synthetic: list[dict[str, Any]]) -> dict[str, Any]:
    """Per statistic: the real and synthetic mean and std and the normalised Wasserstein distance;
    ``shape_distance``: the mean of those distances (None where either set has no value)."""
    from scipy.stats import wasserstein_distance

    table: dict[str, Any] = {}
    for name in SHAPE_STATS:
        r = np.array([row[name] for row in real if row.get(name) is not None], np.float64)
        s = np.array([row[name] for row in synthetic if row.get(name) is not None], np.float64)
        entry: dict[str, Any] = {"real_mean": None, "real_std": None, "synthetic_mean": None,
                                 "synthetic_std": None, "distance": None}
        turn = 90.0 - _axial_mean(r) if name == "angle_deg" and len(r) else 0.0
        if turn:  # axial: the means are axial means, the rest is measured with the real mean axis at 90
            r, s = (r + turn) % 180.0, (s + turn) % 180.0
        if len(r):
            entry.update(real_mean=float((r.mean() - turn) % 180.0 if turn else r.mean()), real_std=float(r.std()))
        if len(s):
            entry.update(synthetic_mean=float((s.mean() - turn) % 180.0 if turn else s.mean()),
                         synthetic_std=float(s.std()))
        if len(r) and len(s):
            scale = r.std() if r.std() > 1e-12 else 1.0
            entry["distance"] = float(wasserstein_distance(s, r) / scale)
        table[name] = entry
    distances = [e["distance"] for e in table.values() if e["distance"] is not None]
    return {"shape_stats": table, "shape_distance": float(np.mean(distances)) if distances else None}
