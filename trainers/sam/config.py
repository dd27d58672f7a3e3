"""The sections of a ``train-sam`` recipe: data (the training mix, the validation split, image
size, augmentation), LoRA adapters and loss weights. ``train.SamTrainConfig`` holds them."""

from __future__ import annotations

from pydantic import field_validator, model_validator

from sonosynth.datasets.augment import AugmentConfig
from sonosynth.datasets.mix import MixConfig, MixSource, check_validation_split
from sonosynth.infra.config import Config

REAL = "real"
"""The source whose dataset gives the default validation split (else the first source)."""


class SamValConfig(Config):
    """The validation split the exported checkpoint is chosen on (never test)."""

    dataset: str | None = None
    """Dataset folder or s3:// prefix; null: the dataset of the source named real (else the first)."""
    split: str = "val"
    """Split to validate on; 'test' is refused (model selection on test inflates its scores)."""
    count: int | None = None
    """Use at most this many of its samples with a mask (seeded choice); null: all."""

    def wanted(self, available: int) -> int | None:
        """How many of ``available`` samples to validate on (None: all of them)."""
        return None if self.count is None else min(self.count, available)

    @field_validator("split")
    @classmethod
    def _not_test(cls, v: str) -> str:
        return check_validation_split(v)


class SamDataConfig(MixConfig):
    """The training mix, the validation split, image size, augmentation and box prompts."""

    sources: dict[str, MixSource] = {}
    """Named datasets of the training mix, e.g. {real: {dataset: runs/hc18, count: 20}, synthetic:
    {dataset: runs/syn, count: 495}}; only samples with a mask are taken. The CLI's --dataset sets
    sources.real.dataset and --synthetic sources.synthetic.dataset; --set data.sources.synthetic.count=0
    leaves a source out."""
    val: SamValConfig = SamValConfig()
    """Validation split (default: the val split of the real source's dataset)."""
    image_size: int | None = 256
    """Resize images and masks so their longest side is this before augmentation (paper A: 256;
    box jitter and augmentation sizes are given at 256 px); null: native size. SAM's preprocessing
    then resizes to the encoder's input (1024 for vit_b). Prediction resizes the same way."""
    augment: AugmentConfig = AugmentConfig()
    """Paired augmentation preset (none, weak, strong) and the box-prompt jitter (0-19 px at 256 px)."""

    @model_validator(mode="after")
    def _check(self) -> "SamDataConfig":
        if self.image_size is not None and self.image_size < 16:
            raise ValueError("image_size must be at least 16 (paper A: 256), or null for native size")
        val = self.val_dataset
        for name, s in self.used_sources().items():
            if s.dataset == val and (s.split is None or s.split == self.val.split):
                raise ValueError(f"data.sources.{name} trains on split {s.split!r} of {s.dataset}, which holds the "
                                 f"validation split {self.val.split!r}; set data.sources.{name}.split=train")
        return self

    @property
    def val_dataset(self) -> str:
        if self.val.dataset:
            return self.val.dataset
        first = self.sources.get(REAL) or next(iter(self.sources.values()))
        return first.dataset


class SamLoraConfig(Config):
    """LoRA adapters on the image encoder's attention (mode lora), with peft."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank (null: alpha = rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["qkv"]
    """Linear layers of the image encoder that get adapters (segment_anything's attention: qkv, proj)."""

    @model_validator(mode="after")
    def _check(self) -> "SamLoraConfig":
        if self.rank < 1:
            raise ValueError("rank must be at least 1, e.g. 8")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules is empty; segment_anything's attention has qkv and proj")
        return self


class SamLossConfig(Config):
    """MONAI DiceCELoss(sigmoid=True, squared_pred=True) on the low-res logits (paper A)."""

    dice_weight: float = 1.0
    """Weight of the Dice term."""
    ce_weight: float = 1.0
    """Weight of the (binary) cross-entropy term."""

    @model_validator(mode="after")
    def _check(self) -> "SamLossConfig":
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ValueError("dice_weight and ce_weight must be >= 0 and not both 0")
        return self
