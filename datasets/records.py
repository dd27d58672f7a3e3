"""The sample contract: one WebDataset record = image.png, mask.png (optional), meta.json.

Keys are deterministic and URL-safe (``[A-Za-z0-9_-]``; no dots, which WebDataset reads
as extension separators): real samples ``<cohort>-<source id>``, synthetic samples
``syn-<generation run id>-<sample index>``.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

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


DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError)
"""What PIL and json raise on damaged bytes (a truncated or bit-flipped PNG, broken JSON)."""


class MemberError(ValueError):
    """A member of a record is missing or does not decode; ``member`` is its name (<key>.<ext>).
    The readers turn it into a ``CorruptShardError`` naming the shard and the byte offset."""

    def __init__(self, key: str, ext: str, problem: str):
        super().__init__(f"sample {key}: {ext} {problem}")
        self.key, self.ext, self.member, self.problem = key, ext, f"{key}.{ext}", problem


def decode_member(key: str, ext: str, data: bytes | None, decode: Callable[[bytes], Any]) -> Any:
    """``decode(data)``, or a MemberError naming ``<key>.<ext>`` when it is missing or damaged."""
    if data is None:
        raise MemberError(key, ext, "is missing from the shard")
    try:
        return decode(data)
    except UnidentifiedImageError:
        raise MemberError(key, ext, "does not decode (not an image: the PNG signature or header is damaged)") from None
    except DECODE_ERRORS as err:
        raise MemberError(key, ext, f"does not decode ({type(err).__name__}: {err})") from err


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
        """The sample of a record; a MemberError names a member that is missing or damaged."""
        key, mask = record["__key__"], record.get("mask.png")
        return cls(
            key=key,
            image=decode_member(key, "image.png", record.get("image.png"), decode_png),
            mask=decode_member(key, "mask.png", mask, decode_png) if mask is not None else None,
            meta=decode_member(key, "meta.json", record.get("meta.json"), json.loads),
        )
