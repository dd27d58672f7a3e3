"""The job's label map, the image transforms of the FU-LoRA protocol, and class-balanced picks.

- ``LabelMap``: the fixed, sorted class list of a job (from the config, or the union of the
  training datasets' manifests' ``plane`` column). Indices never depend on which classes a split
  happens to hold: the African test set has no "other" and still uses the training job's map.
- ``ClassifierTransform``: uint8 grayscale (or RGB) image -> normalised float [3, S, S]. RGB is
  converted to luma (the weights PIL's ``convert("L")`` uses at ingest) and every image is
  replicated to 3 channels. Eval: resize the longer side to S (antialiased) and pad to a square
  (black, centred), so the aspect ratio is kept whatever the country's image size. Train with
  ``augment: paper``: FU-LoRA's rotation within +-15 deg, random resized crop (area 0.08-1,
  aspect 3/4-4/3) to S x S, horizontal flip p 0.5 (kornia.augmentation, torchvision's semantics),
  one draw per (seed, epoch, index), or from the global torch RNG (``index=None``: the training
  engine seeds it per example). Optional brightness/contrast jitter (not the paper's, off by
  default). The work is done on one channel, replicated to 3 at the end.
- ``class_balanced_counts`` / ``class_balanced_keys``: FU-LoRA's HB set (1,150 real images,
  230 per class), seeded, with the training mix's nested choice (``datasets.mix.choose``) in
  each class: for one seed, a smaller total takes a subset of a larger one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator

from sonosynth.datasets.mix import choose, seeded_order
from sonosynth.infra.config import Config
from sonosynth.infra.seeds import derive_seed


class LabelError(ValueError):
    """A sample's label is not in the job's label map (or is missing)."""


Manifest = Any
"""A manifest: a pyarrow Table, a list of row dicts, or a dataset URI (folder or s3://)."""


def rows_of(manifest: Manifest) -> list[dict[str, Any]]:
    """The rows of a manifest given as a pyarrow Table, a list of dicts or a dataset URI."""
    if isinstance(manifest, str):
        from sonosynth.datasets.manifest import read_manifest
        from sonosynth.infra.storage import open_storage

        manifest = read_manifest(open_storage(manifest))
    if hasattr(manifest, "to_pylist"):
        return manifest.to_pylist()
    return list(manifest)


@dataclass(frozen=True)
class LabelMap:
    """Class names in a fixed sorted order; a class's index is its position."""

    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        if len(classes) < 2:
            raise LabelError(f"a label map needs at least 2 classes, got {list(classes)}")
        if list(classes) != sorted(set(classes)) or not all(isinstance(c, str) and c for c in classes):
            raise LabelError(f"classes must be distinct non-empty names, sorted: got {list(classes)}; "
                             "use LabelMap.from_classes(...)")
        object.__setattr__(self, "classes", classes)

    @classmethod
    def from_classes(cls, classes: Iterable[str]) -> "LabelMap":
        """The map of a configured class list (sorted, duplicates dropped)."""
        return cls(tuple(sorted(set(classes))))

    @classmethod
    def from_manifests(cls, *manifests: Manifest, exclude: Iterable[str] = ()) -> "LabelMap":
        """The union of the manifests' ``plane`` values (nulls ignored), less ``exclude``
        (e.g. FU-LoRA leaves out FETAL_PLANES_DB's maternal cervix)."""
        drop = set(exclude)
        found = {r.get("plane") for m in manifests for r in rows_of(m)} - {None} - drop
        return cls.from_classes(found)

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __contains__(self, label: object) -> bool:
        return label in self.classes

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    @property
    def label2id(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def index(self, label: str | None, key: str = "?") -> int:
        """The index of ``label``; LabelError naming the sample ``key`` and the label otherwise."""
        if label is None:
            raise LabelError(f"sample {key} has no plane label; leave it out of the job or re-ingest it with labels")
        try:
            return self.classes.index(label)
        except ValueError:
            raise LabelError(f"sample {key} has label {label!r}, which is not one of the job's classes "
                             f"{list(self.classes)}; add it to the classes or leave such samples out "
                             f"(LabelMap.select)") from None

    def encode(self, rows: Iterable[dict[str, Any]]) -> list[int]:
        """Indices of the rows' ``plane`` (rows with ``key`` and ``plane``, e.g. manifest rows)."""
        return [self.index(r.get("plane"), r.get("key", "?")) for r in rows]

    def select(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows whose plane is one of the classes (deliberately leaving the others out)."""
        return [r for r in rows if r.get("plane") in self.classes]

    def missing_from(self, rows: Iterable[dict[str, Any]]) -> list[str]:
        """Classes with no sample in ``rows`` (e.g. ['other'] for the African test set)."""
        return sorted(set(self.classes) - {r.get("plane") for r in rows})

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}


def class_balanced_counts(manifest_rows: Iterable[dict[str, Any]], n_total: int, seed: int = 0,
                          classes: Sequence[str] | None = None) -> dict[str, int]:
    """How many samples of each class make ``n_total`` as balanced as availability allows: an
    equal share each, a class with fewer samples gives all it has and the rest is shared by the
    others; the remainder of the division goes to the first classes of a seeded order (the
    same order for every total, so no class's count shrinks as the total grows). ``classes``
    (default: every plane in the rows) limits the classes drawn from."""
    have: dict[str, int] = {}
    for r in manifest_rows:
        plane = r.get("plane")
        if plane is not None and (classes is None or plane in classes):
            have[plane] = have.get(plane, 0) + 1
    if n_total < 0 or n_total > sum(have.values()):
        raise ValueError(f"cannot pick {n_total} samples from {sum(have.values())} ({dict(sorted(have.items()))})")
    counts, open_ = {c: 0 for c in sorted(have)}, sorted(have)
    rank = {c: i for i, c in enumerate(seeded_order(have, seed, "class-balanced"))}
    left = n_total
    while left and open_:
        share = left // len(open_)
        short = [c for c in open_ if have[c] - counts[c] <= share]
        if short:  # these give everything they have; the rest is shared again
            for c in short:
                left -= have[c] - counts[c]
                counts[c] = have[c]
            open_ = [c for c in open_ if c not in short]
            continue
        for c in open_:
            counts[c] += share
        left -= share * len(open_)
        for c in sorted(open_, key=rank.__getitem__)[:left]:
            counts[c] += 1
        left = 0
    return counts


def class_balanced_keys(manifest_rows: Iterable[dict[str, Any]], n_total: int, seed: int = 0,
                        classes: Sequence[str] | None = None, source: str = "") -> list[str]:
    """The keys of a seeded class-balanced choice of ``n_total`` rows (sorted); ``source`` (the
    mix's source name) salts the choice in each class."""
    rows = list(manifest_rows)
    counts = class_balanced_counts(rows, n_total, seed, classes)
    picked: list[str] = []
    for plane, n in counts.items():
        picked += choose([r["key"] for r in rows if r.get("plane") == plane], n, seed, source, plane)
    return sorted(picked)


def grayscale_stats(images: Iterable[Any]) -> tuple[float, float]:
    """(mean, std) of the pixels of uint8 images, scaled to [0, 1]: the per-dataset
    normalisation for a randomly initialised model (``model.pixel_mean``/``pixel_std``)."""
    total = sq = 0.0
    n = 0
    for image in images:
        x = torch.as_tensor(np.asarray(image)).double() / 255.0
        total += float(x.sum())
        sq += float((x * x).sum())
        n += x.numel()
    if not n:
        raise ValueError("grayscale_stats needs at least one image")
    mean = total / n
    return mean, max(sq / n - mean * mean, 0.0) ** 0.5


class ClassifierAugmentConfig(Config):
    """Training augmentation of the classifier (FU-LoRA's preset, or none)."""

    preset: Literal["none", "paper"] = "paper"
    """paper: rotate +-rotate_deg, random resized crop, horizontal flip (FU-LoRA); none: the eval transform."""
    rotate_deg: float = 15.0
    """Rotation range in degrees, +- (FU-LoRA: 15)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: range of the crop's area as a fraction of the image (FU-LoRA: 0.08-1)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Random resized crop: range of the crop's aspect ratio (torchvision's default, 3/4-4/3)."""
    hflip_p: float = 0.5
    """Probability of a horizontal flip."""
    brightness: float = 0.0
    """Not in the paper (0: off). Add a random offset in +-brightness to [0, 1] pixels (scanner gain)."""
    contrast: float = 0.0
    """Not in the paper (0: off). Scale pixels about the image mean by a factor in 1 +- contrast."""
    max_side: int | None = None
    """Downscale images whose longer side exceeds this before augmenting (antialiased; several times
    faster, less detail in small crops). Null: augment at native resolution, like the paper."""

    @model_validator(mode="after")
    def _check(self) -> "ClassifierAugmentConfig":
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("crop_scale must be (low, high) with 0 < low <= high <= 1, e.g. [0.08, 1.0]")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("crop_ratio must be (low, high) with 0 < low <= high, e.g. [0.75, 1.333]")
        if not 0 <= self.hflip_p <= 1 or self.rotate_deg < 0:
            raise ValueError("hflip_p must be in [0, 1] and rotate_deg at least 0")
        if not 0 <= self.brightness <= 1 or not 0 <= self.contrast < 1:
            raise ValueError("brightness must be in [0, 1] and contrast in [0, 1), e.g. 0.1 (0: off)")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError("max_side must be at least 16 (or null: native resolution)")
        return self


def to_gray1(image: Any) -> torch.Tensor:
    """Float [1, H, W] in [0, 1] from uint8 [H,W], [1,H,W], [3,H,W] or [H,W,3] (tensor or array);
    RGB becomes luma (0.299, 0.587, 0.114, as at ingest)."""
    if not isinstance(image, torch.Tensor):
        image = np.asarray(image)
        if not image.flags.writeable:  # e.g. decoded from bytes: torch warns on read-only memory
            image = image.copy()
    x = torch.as_tensor(image)
    if x.ndim == 3 and x.shape[-1] in (3, 4) and x.shape[0] not in (1, 3):
        x = x[..., :3].permute(2, 0, 1)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError("expected a grayscale or RGB image ([H,W], [1,H,W], [3,H,W] or [H,W,3]), "
                         f"got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[0] == 3:
        from kornia.color import rgb_to_grayscale

        x = rgb_to_grayscale(x)
    return x


def to_gray3(image: Any) -> torch.Tensor:
    """Float [3, H, W] in [0, 1]: ``to_gray1`` with its one channel repeated 3 times."""
    return to_gray1(image).expand(3, -1, -1).contiguous()


def _resize_long(x: torch.Tensor, size: int) -> torch.Tensor:
    """[C,H,W] with its longer side resized to ``size`` (bilinear, antialiased when shrinking)."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x[None], size=shape, mode="bilinear", antialias=scale < 1, align_corners=False)[0]


def resize_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """[C,H,W] -> [C,size,size]: longer side to ``size`` (antialiased bilinear), centred on black."""
    if max(x.shape[-2:]) != size:
        x = _resize_long(x, size)
    h, w = x.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


class ClassifierTransform:
    """uint8 image -> normalised float [3, S, S].

    The train transform draws its augmentation either from (seed, epoch, index) (``index``
    given: the global RNG is left alone) or, with ``index=None``, from the global torch RNG,
    which the training engine seeds per example (so a resumed job draws the same). The work
    is done on one channel, replicated to 3 at the end."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: ClassifierAugmentConfig | None = None, seed: int = 0):
        self.size, self.seed = image_size, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment if augment is not None and augment.preset != "none" else None
        self.ops: list = []
        if self.augment is not None:
            import kornia.augmentation as K

            a = self.augment
            self.ops = [K.RandomRotation(a.rotate_deg, p=1.0),
                        K.RandomResizedCrop((image_size, image_size), scale=a.crop_scale, ratio=a.crop_ratio, p=1.0),
                        K.RandomHorizontalFlip(p=a.hflip_p)]

    @property
    def train(self) -> bool:
        return self.augment is not None

    def __call__(self, image: Any, index: int | None = 0, epoch: int = 0) -> torch.Tensor:
        x = to_gray1(image)
        if self.augment is None:
            x = resize_pad(x, self.size)
        elif index is None:
            x = self._augment(x)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed("classifier-augment", self.seed, epoch, index))
                x = self._augment(x)
        return (x.expand(3, -1, -1) - self.mean) / self.std

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        a = self.augment
        if a.max_side and max(x.shape[-2:]) > a.max_side:
            x = _resize_long(x, a.max_side)
        x = x[None]
        for op in self.ops:
            x = op(x)
        x = x[0]
        if a.brightness or a.contrast:
            u = torch.rand(2)
            if a.contrast:
                mean = x.mean()
                x = (x - mean) * (1 + a.contrast * (2 * u[0] - 1)) + mean
            if a.brightness:
                x = x + a.brightness * (2 * u[1] - 1)
            x = x.clamp(0, 1)
        return x

    def batch(self, images: Sequence[Any], indices: Sequence[int], epoch: int = 0) -> torch.Tensor:
        """[B, 3, S, S] of ``images`` (sample ``indices[i]`` for the draws)."""
        return torch.stack([self(im, i, epoch) for im, i in zip(images, indices)])


def build_transforms(image_size: int, mean: Sequence[float], std: Sequence[float],
                     augment: ClassifierAugmentConfig | None, seed: int = 0) -> tuple[ClassifierTransform,
                                                                                     ClassifierTransform]:
    """(train transform, eval transform) of a job."""
    return ClassifierTransform(image_size, mean, std, augment, seed), ClassifierTransform(image_size, mean, std)
