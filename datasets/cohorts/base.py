"""What every cohort adapter provides: records (cheap, from names and index files) and
``load`` (reads the pixels, raising :class:`InputError` with a quarantine reason)."""

from __future__ import annotations

import csv
import io
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sonosynth.datasets.records import make_key

# Quarantine reasons (the `reason` field of quarantine.jsonl).
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_MISSING = "image_missing"
MASK_MISSING = "mask_missing"
UNREADABLE_MASK = "unreadable_mask"
MASK_SIZE_MISMATCH = "mask_size_mismatch"
EMPTY_MASK = "empty_mask"
MASK_NOT_ELLIPSE = "mask_not_ellipse"
UNKNOWN_LABEL = "unknown_label"
DUPLICATE_KEY = "duplicate_key"
REASONS = (UNREADABLE_IMAGE, IMAGE_MISSING, MASK_MISSING, UNREADABLE_MASK, MASK_SIZE_MISMATCH,
           EMPTY_MASK, MASK_NOT_ELLIPSE, UNKNOWN_LABEL, DUPLICATE_KEY)


class InputError(ValueError):
    """An input that goes to quarantine; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class CohortError(ValueError):
    """The cohort as a whole cannot be read (wrong folder, unreadable index)."""


@dataclass(frozen=True)
class SourceRecord:
    cohort: str
    source_id: str
    """Identifier inside the cohort (file stem); the sample key is derived from it."""
    image_path: str | None = None
    mask_path: str | None = None
    mask_expected: bool = False
    """The cohort ships masks, so a missing one is an error rather than 'no mask'."""
    patient_id: str | None = None
    plane: str | None = None
    official_split: str | None = None
    """train/test as the cohort's own index says, when it says."""
    pixel_size_mm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    """Cohort-specific meta.json fields (country, operator, head circumference...)."""
    error: tuple[str, str] | None = None
    """(reason, detail) already known from names and index files."""

    @property
    def key(self) -> str:
        return make_key(self.cohort, self.source_id)


class Cohort(ABC):
    name: str
    has_masks: bool = False

    @abstractmethod
    def records(self) -> list[SourceRecord]:
        """Every input found, in a stable order (bad ones carry ``error``)."""

    def load(self, rec: SourceRecord) -> tuple[np.ndarray, np.ndarray | None]:
        """(uint8 HxW image, uint8 HxW mask or None); raises InputError."""
        image = read_gray(rec.image_path, UNREADABLE_IMAGE)
        mask = None
        if rec.mask_path is not None:
            mask = read_gray(rec.mask_path, UNREADABLE_MASK)
            if mask.shape != image.shape:
                raise InputError(MASK_SIZE_MISMATCH,
                                 f"mask {rec.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image "
                                 f"{rec.image_path} is {image.shape[1]}x{image.shape[0]}")
        return image, mask


def read_gray(path: str | None, reason: str) -> np.ndarray:
    """8-bit grayscale pixels of a PNG/JPEG; RGB is converted, 16-bit is rescaled."""
    if path is None:
        raise InputError(reason, "no file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = arr.max() or 1.0
                return (arr * (255.0 / top)).astype(np.uint8)
            return np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise InputError(reason, f"{path} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(reason, f"{path} cannot be decoded ({err}); re-export it as PNG") from None


def read_index(path: str | Path) -> list[dict[str, str]]:
    """Rows of an index CSV: ';' or ',' separated, UTF-8 with or without BOM, headers and
    values stripped of surrounding spaces."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CohortError(f"index {path} does not exist; pass the cohort's CSV with --index") from None
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    first = text.splitlines()[0] if text else ""
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise CohortError(f"index {path} is empty") from None
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        rows.append({h: v.strip() for h, v in zip(header, values)})
    return rows


def need_column(rows: list[dict[str, str]], names: tuple[str, ...], path: str | Path) -> str:
    """The first of ``names`` present in the index header (case-insensitive)."""
    header = {h.lower(): h for h in (rows[0] if rows else {})}
    for name in names:
        if name.lower() in header:
            return header[name.lower()]
    raise CohortError(f"index {path} has no column {' or '.join(names)} "
                      f"(it has: {', '.join(header.values())})")


def find_images(src: Path) -> list[Path]:
    """Image files under ``src`` (recursively), annotation masks excluded, sorted."""
    if not src.is_dir():
        raise CohortError(f"source folder {src} does not exist or is not a folder")
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
    return sorted(p for p in src.rglob("*")
                  if p.suffix.lower() in exts and not p.stem.endswith("_Annotation")
                  and "mask" not in {part.lower() for part in p.relative_to(src).parts[:-1]})


def annotation_for(image: Path, src: Path) -> Path | None:
    """``<stem>_Annotation.png`` beside the image, or in a sibling or top-level ``mask/``."""
    name = f"{image.stem}_Annotation.png"
    for folder in (image.parent, image.parent.parent / "mask", src / "mask",
                   image.parent.parent / "masks", src / "masks"):
        for candidate in (folder / name, folder / image.name):
            if candidate.is_file() and candidate != image:
                return candidate
    return None


_TRAIN_VALUES = {"1": "train", "0": "test", "train": "train", "test": "test",
                 "true": "train", "false": "test"}


def official_split(value: str | None) -> str | None:
    return _TRAIN_VALUES.get((value or "").strip().lower())


def label_error(image: Path | None, stem: str, src: Path, plane: str | None,
                raw_plane: str | None) -> tuple[str, str] | None:
    """The quarantine reason of an index row: no image file, or a plane outside the vocabulary."""
    if image is None:
        return IMAGE_MISSING, f"index row {stem!r} has no image file under {src}"
    if plane is None:
        return UNKNOWN_LABEL, (f"plane {raw_plane!r} of {image} is not one of abdomen, brain, "
                               "femur, thorax, cervix, other; fix the index CSV")
    return None


def int_or_none(text: str | None) -> int | None:
    m = re.search(r"\d+", text or "")
    return int(m.group()) if m else None
