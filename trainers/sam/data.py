"""train-sam's data: which samples (the training mix and the validation split, samples with a
mask only) and how one becomes a SAM example.

An example: the image and mask resized so the longest side is ``data.image_size``, augmented
with one paired draw, then the box prompt taken from the **augmented** mask (each side pushed
out by 0..``box_jitter_px`` px at 256 px scale), then SAM's own preprocessing (longest side to
the encoder's input, normalise, pad) and the mask in the frame of SAM's low-res logits.
``image_identities`` names each example's image for the embedding cache (``trainers.embedding_store``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from sonosynth.datasets.augment import (PairedAugment, box_from_mask, boxes_to_input, draw_seed, full_box,
                                        logit_target, preprocess_shape, resize_mask, sam_preprocess)
from sonosynth.datasets.indexed import IMAGE, IMAGE_LEN, SHARD, START, IndexedMix
from sonosynth.datasets.mix import Manifests, Taken, choose, take
from sonosynth.infra.storage import StorageConfig
from sonosynth.trainers.sam.config import SamDataConfig
from sonosynth.trainers.sam.models import resize_image


PREPROCESS_VERSION = 1
"""What ``SamExamples.image`` makes of a sample (``resize_pair`` to ``data.image_size``, then
``sam_preprocess``); part of the embedding cache's key: bump it when that changes."""


class Embeddings(Protocol):
    """Cached embeddings, one float32 [C, g, g] tensor per example (``trainers.embedding_store``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


def with_mask(rows: list[dict[str, Any]]) -> list[str]:
    return [r["key"] for r in rows if r.get("has_mask")]


def plan_sam_data(d: SamDataConfig, storage: StorageConfig | None = None) -> tuple[list[Taken], Taken]:
    """What train-sam takes, from the manifests: each used source's choice of its samples with a
    mask, and the validation split's (all of them, or ``data.val.count``)."""
    manifests = Manifests(storage)
    train = [take(name, s, with_mask(manifests.source(name, s)), d.seed, what="samples with a mask")
             for name, s in d.used_sources().items()]
    val_keys = with_mask(manifests.split(d.val_dataset, d.val.split))
    val = Taken("val", d.val_dataset, d.val.split, len(val_keys),
                choose(val_keys, d.val.wanted(len(val_keys)), d.seed, "val"))
    return train, val


def resize_pair(image: np.ndarray, mask: np.ndarray, long_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8) and mask resized so the longest side is ``long_side`` (None: unchanged)."""
    if long_side is None or max(image.shape[:2]) == long_side:
        return image, mask
    size = preprocess_shape(*image.shape[:2], long_side)
    return resize_image(image, size), resize_mask(mask, size).numpy()


def sam_example(image: np.ndarray, mask: np.ndarray, *, augment: PairedAugment, model_size: int, low_res: int,
                jitter_px: int, seed: int, epoch: int, key: str, with_image: bool = True) -> dict[str, Any]:
    """One SAM example of an image and its 0/1 mask: augment both with the draw of (epoch, key),
    take the box from the augmented mask (an empty one prompts with the whole image, against an
    all-zero target), then SAM's preprocessing. {box [4] (input frame), target [1, L, L], image
    [3, S, S] (``with_image``)}."""
    img, msk = augment(image, mask, epoch=epoch, index=key)
    box = box_from_mask(msk, jitter_px, np.random.default_rng(draw_seed("box", seed, epoch, key)))
    if box is None:
        box = full_box(msk.shape)
    out = {"box": torch.from_numpy(boxes_to_input(box[None], msk.shape, model_size)[0]),
           "target": logit_target(msk, model_size, low_res)}
    if with_image:
        out["image"] = sam_preprocess(img, model_size)[0]
    return out


class SamExamples(Dataset):
    """SAM examples (``sam_example``) of a map-style image+mask dataset, plus the preprocessed
    ``image`` [3, S, S] or its cached ``embedding`` [C, g, g].

    Training examples (``fixed=False``) draw their augmentation and box jitter from the global
    numpy RNG, which the engine seeds per example; validation examples (``fixed=True``) get one
    fixed box per sample and no augmentation."""

    def __init__(self, source: Dataset, *, augment: PairedAugment, work_size: int | None, model_size: int,
                 low_res: int, jitter_px: int, seed: int, fixed: bool, embeddings: Embeddings | None = None):
        self.source, self.augment, self.work_size = source, augment, work_size
        self.model_size, self.low_res, self.jitter_px, self.seed = model_size, low_res, jitter_px, seed
        self.fixed = fixed
        self.embeddings = embeddings

    def __len__(self) -> int:
        return len(self.source)

    def raw(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
        """(key, uint8 image, 0/1 mask) at the working size, before augmentation."""
        item = self.source[i]
        image = item["image"][0].numpy()
        mask = (item["mask"][0].numpy() > 0).astype(np.uint8)
        image, mask = resize_pair(image, mask, self.work_size)
        return item["key"], image, mask

    def __getitem__(self, i: int) -> dict[str, Any]:
        key, image, mask = self.raw(i)
        epoch = 0 if self.fixed else int(np.random.randint(2**31))  # the engine seeds it per example
        out = sam_example(image, mask, augment=self.augment, model_size=self.model_size, low_res=self.low_res,
                          jitter_px=self.jitter_px, seed=self.seed, epoch=epoch, key=key,
                          with_image=self.embeddings is None)
        if self.embeddings is not None:
            out["embedding"] = self.embeddings[i]
        return out

    def image(self, i: int) -> torch.Tensor:
        """The unaugmented preprocessed image of example ``i`` (what the cache embeds)."""
        _, image, _ = self.raw(i)
        return sam_preprocess(image, self.model_size)[0]


def image_identities(source: IndexedMix) -> list[str]:
    """Each sample's identity for the embedding cache: dataset uri, sample key and the sha256 of its
    ``image.png`` bytes (manifests hold no content hash, and a dataset ingested again under the same
    keys may hold other pixels)."""
    out, fds = [], {}
    try:
        for i in range(len(source)):
            ds, j = source.locate(i)
            shard, start, image, length = (int(ds.index[j][c]) for c in (SHARD, START, IMAGE, IMAGE_LEN))
            path = ds.paths[shard]
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            data = os.pread(fds[path], length, start + image)
            out.append(f"{ds.uri}\n{ds.key(j)}\nsha256:{hashlib.sha256(data).hexdigest()}")
    finally:
        for fd in fds.values():
            os.close(fd)
    return out
