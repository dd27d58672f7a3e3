"""The sample contract: one WebDataset record = image.png, mask.png (optional), meta.json.

Keys are deterministic and URL-safe (``[A-Za-z0-9_-]``; no dots, which WebDataset reads
as extension separators): real samples ``<cohort>-<source id>``, synthetic samples
``syn-<generation run id>-<sample index>``.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(cohort: str, source_id: str) -> str:
    return f"{_UNSAFE.sub('_', cohort)}-{_UNSAFE.sub('_', source_id).strip('_')}"


def synthetic_key(run_id: str, index: int) -> str:
    return f"syn-{_UNSAFE.sub('_', run_id)}-{index:08d}"


def encode_png(array: np.ndarray, compress_level: int = 3) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L") if im.mode not in ("L",) else im)


@dataclass
class Sample:
    key: str
    image: np.ndarray
    """uint8 HxW grayscale."""
    mask: np.ndarray | None
    """uint8 HxW, 0/255, filled region; None when the sample has no mask."""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_wds(self) -> dict[str, Any]:
        record = {"__key__": self.key, "image.png": encode_png(self.image),
                  "meta.json": json.dumps(self.meta, sort_keys=True).encode()}
        if self.mask is not None:
            record["mask.png"] = encode_png(self.mask)
        return record

    @classmethod
    def from_wds(cls, record: dict[str, Any]) -> "Sample":
        mask = record.get("mask.png")
        return cls(
            key=record["__key__"],
            image=decode_png(record["image.png"]),
            mask=decode_png(mask) if mask is not None else None,
            meta=json.loads(record["meta.json"]),
        )
