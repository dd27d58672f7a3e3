"""Data order and loading of a training job: pure functions of (seed, step, micro, rank).

Each rank's micro-batch indices come from a seeded permutation per epoch, and every example
is loaded with the global RNGs seeded from the same key, so a resumed job sees exactly the
batches (augmentation included) an uninterrupted one would, in any DataLoader worker.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sonosynth.infra.seeds import derive_seed


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def example_indices(n: int, seed: int, *, step: int, micro: int, rank: int, world: int,
                    micro_batch: int, grad_accum: int) -> list[int]:
    """The examples of one rank's micro-batch: a seeded permutation per epoch, read in order."""
    start = ((step * grad_accum + micro) * world + rank) * micro_batch
    return [int(_permutation(n, seed, p // n)[p % n]) for p in range(start, start + micro_batch)]


def noise_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return derive_seed(seed, step, micro, rank)


class StepBatches(Sampler):
    """Batch sampler of one rank: its micro-batches from step ``start`` to ``total``.

    Each batch is a list of (example index, example seed) keys, a pure function of (seed,
    step, micro, rank): a resumed job gets exactly the batches the uninterrupted job would."""

    def __init__(self, n: int, seed: int, *, start: int, total: int, rank: int, world: int,
                 micro_batch: int, grad_accum: int):
        self.n, self.seed, self.start, self.total = n, seed, start, total
        self.rank, self.world, self.micro_batch, self.grad_accum = rank, world, micro_batch, grad_accum

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            for micro in range(self.grad_accum):
                idx = example_indices(self.n, self.seed, step=step, micro=micro, rank=self.rank, world=self.world,
                                      micro_batch=self.micro_batch, grad_accum=self.grad_accum)
                yield [(i, derive_seed(self.seed, "example", step, micro, self.rank, k)) for k, i in enumerate(idx)]


class ShareBatches(Sampler):
    """Batch sampler of one rank's share of an evaluation set (examples rank, rank + world, ...),
    each example with a fixed seed: every evaluation sees the same inputs."""

    def __init__(self, n: int, seed: int, *, rank: int, world: int, batch: int):
        self.keys = [(i, derive_seed(seed, "eval", i)) for i in range(rank, n, world)]
        self.batch = batch

    def __len__(self) -> int:
        return math.ceil(len(self.keys) / self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for i in range(0, len(self.keys), self.batch):
            yield self.keys[i:i + self.batch]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


class SeededExamples(Dataset):
    """``dataset[i]`` with the global RNGs seeded from the key's seed, in whichever process loads it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        seed_everything(seed)
        return self.dataset[index]


def make_loader(dataset: Dataset, batches: Sampler, collate, *, workers: int, prefetch: int, pin: bool,
                persistent: bool = False) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=persistent)
    return DataLoader(SeededExamples(dataset), batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      pin_memory=pin, **kwargs)


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors in (nested) dicts, lists and tuples moved to ``device``; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj
