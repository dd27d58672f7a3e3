"""The ``quality`` stage's config: the two sets, the feature extractor, the figures, label fidelity, the gate."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from sonosynth.infra.config import Config
from sonosynth.infra.storage import StorageConfig
from sonosynth.infra.tracking import TrackingConfig

FeatureKind = Literal["tiny", "inception", "resnet50", "sam", "classifier"]
OnFail = Literal["skip_synthetic", "train_without"]


class QualitySet(Config):
    """One side of the comparison: a sonosynth dataset and which of its samples to read."""

    dataset: str
    """Dataset folder or s3:// prefix (from `sonosynth ingest` or `sonosynth generate`)."""
    split: str | None = None
    """Read the samples of this split (null: every sample)."""
    limit: int | None = None
    """Read at most this many samples (a seeded choice from the manifest; null: all)."""

    @model_validator(mode="after")
    def _check(self) -> "QualitySet":
        if not self.dataset.strip():
            raise ValueError("dataset is empty; give a dataset folder or s3:// prefix")
        if self.limit is not None and self.limit < 2:
            raise ValueError("limit must be at least 2 (or null: every sample)")
        return self


class TinyFeaturesConfig(Config):
    """The tiny extractor: a random conv net (3x3 stride-2 convolutions, GELU, mean-pooled), for tests and the demo."""

    channels: list[int] = [8, 16, 32]
    """Output channels of each convolution; the last is the feature dimension."""
    seed: int = 0
    """Seed of the random weights: the same config and seed, the same net."""

    @model_validator(mode="after")
    def _check(self) -> "TinyFeaturesConfig":
        if not self.channels or min(self.channels) < 1:
            raise ValueError("channels needs at least one positive width, e.g. [8, 16, 32]")
        return self


class FeaturesConfig(Config):
    """Which network turns an image into a feature vector (weights from local files only, never downloaded)."""

    kind: FeatureKind = "tiny"
    """tiny (random conv net), inception (Inception-v3 in the FID format: torch-fidelity's
    weights-inception-2015-12-05-6726825d.pth), resnet50 (a transformers ResNetModel folder, e.g.
    RadImageNet ResNet-50 converted), sam (a SAM image encoder: Meta's .pth or a train-sam model) or
    classifier (a train-classifier model's penultimate features). docs/quality.md says where to get weights."""
    weights: str | None = None
    """Local weights: inception a .pth file; resnet50 a save_pretrained folder; sam a .pth checkpoint
    (arch from sam_arch), a train-sam model/ folder, s3:// prefix or MLflow URI; classifier a model/
    folder, s3:// prefix or MLflow URI (models:/sonosynth-classifier@champion). Null only for tiny."""
    base_checkpoint: str | None = None
    """sam with a train-sam decoder or LoRA model: the local .pth of the base SAM it was fine-tuned from,
    when it is not at the path its config.yaml records."""
    sam_arch: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "vit_b"
    """sam with a .pth checkpoint: its architecture (tiny: the default tiny SAM, for tests)."""
    image_size: int | None = None
    """Square side images are resized to (null: the extractor's own: tiny 64, resnet50 224, inception
    299, sam its encoder's input, classifier the size it was trained at)."""
    fit: Literal["stretch", "center_crop"] = "stretch"
    """How a non-square image becomes square: stretch (the FID convention) or a centre crop first."""
    batch_size: int = 16
    """Images per forward pass."""
    device: str | None = None
    """Torch device (null: cuda when available, else cpu)."""
    tiny: TinyFeaturesConfig = TinyFeaturesConfig()
    """Dimensions and seed of the tiny extractor."""

    @model_validator(mode="after")
    def _check(self) -> "FeaturesConfig":
        if self.kind != "tiny" and not (self.weights or "").strip():
            raise ValueError(f"features.kind {self.kind} needs features.weights: the local weights (docs/quality.md "
                             "says where to get them), or use kind tiny")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError("image_size must be at least 16 (or null: the extractor's own)")
        return self


class MetricsConfig(Config):
    """Settings of the feature-space figures."""

    nearest_k: int = 5
    """k of the k-nearest-neighbour balls of precision/recall and density/coverage (Naeem et al. 2020: 5)."""
    kid_subsets: int = 100
    """KID: subsets the MMD is averaged over (torchmetrics' default: 100)."""
    kid_subset_size: int = 1000
    """KID: samples per subset, capped at the number compared (torchmetrics' default: 1000)."""
    kid_degree: int = 3
    """KID: degree of the polynomial kernel."""
    kid_gamma: float | None = None
    """KID: kernel scale (null: 1 / feature dimension)."""
    kid_coef: float = 1.0
    """KID: kernel offset."""
    bootstrap_kid_subsets: int = 10
    """KID subsets in each bootstrap replicate (fewer than kid_subsets: the replicates are many)."""

    @model_validator(mode="after")
    def _check(self) -> "MetricsConfig":
        for name in ("nearest_k", "kid_subsets", "kid_subset_size", "kid_degree", "bootstrap_kid_subsets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        return self


class FidelityConfig(Config):
    """Label fidelity: a segmenter prompted with the box of each pair's own mask, Dice against that mask."""

    model: str | None = None
    """A SAM fine-tuned by train-sam: its model/ folder, an s3:// prefix or an MLflow URI
    (models:/sonosynth-sam@champion). Null with no predictions: label fidelity is skipped."""
    predictions: str | None = None
    """Instead of model: a folder or s3:// prefix of predicted mask PNGs named <sample key>.png."""
    base_checkpoint: str | None = None
    """Local .pth of the base SAM a decoder or LoRA model was fine-tuned from, when it is not at the
    path its config.yaml records."""
    jitter_px: int = 0
    """Push each side of the box prompt out by a random 0..jitter_px px (at 256 px, scaled; 0: the tight box)."""
    threshold: int = 127
    """Prediction PNG pixels above this value are foreground."""

    @model_validator(mode="after")
    def _check(self) -> "FidelityConfig":
        if self.model and self.predictions:
            raise ValueError("give fidelity.model or fidelity.predictions, not both")
        if self.jitter_px < 0:
            raise ValueError("jitter_px must be 0 or more")
        if not 0 <= self.threshold < 255:
            raise ValueError("threshold must be in 0..254")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.model or self.predictions)


class GateConfig(Config):
    """Limits the synthetic set must meet; the stage reports pass or fail, a pipeline acts on it."""

    label_fidelity_dice_min: float | None = None
    """Fail when the label fidelity Dice mean is below this (null: no limit). Without a segmenter it fails."""
    fid_ratio_max: float | None = None
    """Fail when FID / real-vs-real FID is above this (null: no limit)."""
    on_fail: OnFail = "skip_synthetic"
    """What a pipeline does when the gate fails: skip_synthetic (skip the sections that read the synthetic
    set) or train_without (train those sections without the synthetic source)."""

    @model_validator(mode="after")
    def _check(self) -> "GateConfig":
        if self.label_fidelity_dice_min is not None and not 0 <= self.label_fidelity_dice_min <= 1:
            raise ValueError("label_fidelity_dice_min must be in [0, 1], e.g. 0.8")
        if self.fid_ratio_max is not None and self.fid_ratio_max <= 0:
            raise ValueError("fid_ratio_max must be positive, e.g. 2.0")
        return self


class QualityConfig(Config):
    """``sonosynth quality``: feature-space figures and label fidelity of a synthetic set against real data."""

    real: QualitySet
    """The real data (the reference, and the real-vs-real baseline)."""
    synthetic: QualitySet
    """The synthetic set scored."""
    out: str = "runs/quality"
    """Where summary.json, per_image.parquet and the plots go: a folder or s3:// prefix."""
    features: FeaturesConfig = FeaturesConfig()
    """The feature extractor."""
    metrics: MetricsConfig = MetricsConfig()
    """k of the nearest-neighbour figures and the KID kernel."""
    fidelity: FidelityConfig = FidelityConfig()
    """Label fidelity of the image+mask pairs."""
    gate: GateConfig = GateConfig()
    """Limits that pass or fail the synthetic set."""
    bootstrap: int = 200
    """Bootstrap replicates of every figure's 95% interval (0: no intervals)."""
    bootstrap_method: Literal["percentile", "basic", "BCa"] = "percentile"
    """scipy.stats.bootstrap's interval: percentile, basic, or BCa (bias-corrected: FID's resampling bias
    moves a percentile interval above its figure at small n; BCa costs one extra run per image)."""
    seed: int = 0
    """Seed of the real halves, the choice of synthetic samples, the bootstrap and the plots."""
    worst_cases: int = 8
    """Label-fidelity pairs with the lowest Dice drawn in worst_fidelity.png (0: none)."""
    overwrite: bool = False
    """Allow writing into an output folder that holds another quality job."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking (experiment sonosynth-quality)."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the storage (datasets, predictions and output)."""
    progress: bool = True
    """Show progress bars over feature extraction and label fidelity."""

    @model_validator(mode="after")
    def _check(self) -> "QualityConfig":
        if self.bootstrap < 0 or self.worst_cases < 0:
            raise ValueError("bootstrap and worst_cases must be 0 or more")
        return self

    def job_identity(self) -> dict[str, Any]:
        """What makes another quality job (the operational fields may change on a re-run)."""
        return self.content()
