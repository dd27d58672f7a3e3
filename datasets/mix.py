"""Training mixes: named sources, each a dataset, a split and how many of its samples to take.

A mix reads each source's manifest, keeps the candidates of its split (a task narrows them
further: SAM keeps samples with a mask, the classifier samples of its label map), and takes
``count`` of them, a ``fraction`` of them, or all. Every seeded choice of samples is
``choose``: a permutation of the sorted candidate keys, seeded by (seed, source name), read
from the front. So a choice is nested: for one seed and one set of candidates, the 50 keys a
count of 50 takes are among the 100 a count of 100 takes (paper A's grid of N real images
relies on it). ``Taken`` is what came from one source (its lineage record); ``open_mix``
reads the chosen samples map-style. Training on a test split, or choosing the checkpoint on
one, is refused.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from pydantic import model_validator

from sonosynth.datasets.tario import OnError, ReaderConfig
from sonosynth.infra.config import Config, ConfigError
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.storage import StorageConfig

if TYPE_CHECKING:
    from sonosynth.datasets.indexed import IndexedMix

TEST_SPLIT = "test"
MANIFEST_COLUMNS = ("key", "split", "has_mask", "plane", "patient_id", "source")
"""The manifest columns a mix and its tasks decide with."""


class MixSource(Config):
    """One dataset of a training mix and how many of its samples to take."""

    dataset: str
    """Dataset folder or s3:// prefix, from `sonosynth ingest` or `sonosynth generate`."""
    split: str | None = "train"
    """Take samples of this split (null: every split; only for datasets without held-out samples,
    e.g. generate's output, whose samples are all train)."""
    count: int | None = None
    """Take exactly this many samples (seeded by data.seed: the same ones in every run, and a smaller
    count takes a subset of a larger one's); null takes all; 0 leaves the source out."""
    fraction: float | None = None
    """Instead of count: this fraction of the source's samples (rounded to a count)."""

    @model_validator(mode="after")
    def _check(self) -> "MixSource":
        if not self.dataset.strip():
            raise ValueError("dataset is empty; give a dataset folder or s3:// prefix")
        if self.count is not None and self.fraction is not None:
            raise ValueError(f"{self.dataset}: give count or fraction, not both")
        if self.count is not None and self.count < 0:
            raise ValueError(f"{self.dataset}: count must be 0 or more (0 leaves the source out; null takes all)")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"{self.dataset}: fraction must be in (0, 1], e.g. 0.5")
        return self

    @property
    def used(self) -> bool:
        return self.count != 0

    def wanted(self, available: int) -> int | None:
        """How many of ``available`` candidates to take (None: all of them)."""
        if self.fraction is not None:
            return max(1, round(self.fraction * available)) if available else 0
        return self.count


class MixConfig(Config):
    """What every training mix has: named sources, the seed of the choice, the local shard cache."""

    sources: dict[str, MixSource] = {}
    """Named datasets of the training mix and how much of each."""
    seed: int = 0
    """Seed of which samples each source's count (or fraction) takes."""
    cache_dir: str | None = None
    """Local folder for s3:// shards (null: $SONOSYNTH_CACHE_DIR or ~/.cache/sonosynth/shards)."""
    reader: ReaderConfig = ReaderConfig()
    """How damaged shards are treated (on_error: raise or skip; skipped samples are counted in the job's metrics)."""

    @model_validator(mode="after")
    def _check_sources(self) -> "MixConfig":
        if not self.used_sources():
            raise ValueError("no training data: pass --dataset DS (data.sources.real.dataset), or list "
                             "data.sources (a source with count 0 is left out)")
        for name, source in self.sources.items():
            if source.split == TEST_SPLIT:
                raise ValueError(f"data.sources.{name} takes the test split of {source.dataset}: training on it "
                                 f"would leak it into the scores; set data.sources.{name}.split=train (score "
                                 "the model on test with `sonosynth evaluate`)")
        return self

    def used_sources(self) -> dict[str, MixSource]:
        """The sources the mix takes from (count 0 leaves one out), in order."""
        return {name: s for name, s in self.sources.items() if s.used}


def check_validation_split(split: str) -> str:
    """A validation split (the exported checkpoint is chosen on it) must not be the test split."""
    if split == TEST_SPLIT:
        raise ValueError("the checkpoint is chosen on the validation split, so it must not be test; use val")
    return split


def seeded_order(keys: Iterable[str], seed: int, *salt: object) -> list[str]:
    """The sorted ``keys`` in a permutation seeded by (seed, salt): the order every choice reads from."""
    pool = sorted(keys)
    order = np.random.default_rng(derive_seed("mix", seed, *salt)).permutation(len(pool))
    return [pool[i] for i in order]


def choose(keys: Iterable[str], n: int | None, seed: int, *salt: object) -> list[str]:
    """``n`` of ``keys`` (None: all), sorted: the first ``n`` of ``seeded_order``. Nested: for the
    same keys, seed and salt, a smaller ``n`` takes a subset of what a larger one takes."""
    if n is None:
        return sorted(keys)
    order = seeded_order(keys, seed, *salt)
    if not 0 <= n <= len(order):
        raise ValueError(f"cannot take {n} of {len(order)} samples")
    return sorted(order[:n])


class Manifests:
    """The manifest rows of each dataset a plan looks at, read once (``MANIFEST_COLUMNS``)."""

    def __init__(self, storage: StorageConfig | None = None):
        self.storage = storage
        self._rows: dict[str, list[dict[str, Any]]] = {}

    def rows(self, uri: str) -> list[dict[str, Any]]:
        if uri not in self._rows:
            self._rows[uri] = _read_rows(uri, self.storage)
        return self._rows[uri]

    def split(self, uri: str, split: str | None) -> list[dict[str, Any]]:
        """The rows of ``split`` (None: every row)."""
        return [r for r in self.rows(uri) if split is None or r.get("split") == split]

    def source(self, name: str, source: MixSource) -> list[dict[str, Any]]:
        """The rows of a source's split; a ConfigError naming the source when there are none."""
        rows = self.split(source.dataset, source.split)
        if not rows:
            raise ConfigError(f"data.sources.{name}: {source.dataset} has no samples in split {source.split!r} "
                              f"(its splits: {self.describe_splits(source.dataset)}); set data.sources.{name}.split")
        return rows

    def describe_splits(self, uri: str) -> str:
        """How many samples each split of a dataset has, e.g. 'test 4, train 30, val 6'."""
        counts = Counter(str(r.get("split")) for r in self.rows(uri))
        return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"


def _read_rows(uri: str, storage: StorageConfig | None) -> list[dict[str, Any]]:
    from sonosynth.datasets.manifest import read_manifest
    from sonosynth.infra.storage import StorageError, open_storage

    try:
        table = read_manifest(open_storage(uri, storage))
    except (StorageError, FileNotFoundError) as err:
        raise ConfigError(f"cannot read the dataset {uri} ({str(err).splitlines()[0][:200]}); give a dataset "
                          "written by `sonosynth ingest` or `sonosynth generate` (a folder or s3:// prefix "
                          "holding manifest.parquet)") from None
    data = table.select([c for c in MANIFEST_COLUMNS if c in table.column_names]).to_pydict()
    return [dict(zip(data, values)) for values in zip(*data.values())]


@dataclass
class Taken:
    """The samples a mix took from one source, and its lineage record."""

    name: str
    dataset: str
    split: str | None
    available: int
    """Candidates the choice was made from."""
    keys: list[str]
    """The chosen sample keys, sorted."""

    def lineage(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "available": self.available,
                "examples": len(self.keys), "keys_sha256": hashlib.sha256("\n".join(self.keys).encode()).hexdigest()}


def take(name: str, source: MixSource, candidates: Sequence[str], seed: int, n: int | None = None,
         what: str = "samples") -> Taken:
    """``n`` of a source's candidate keys (default: what its count or fraction asks for), by ``choose``;
    a ConfigError naming the source when it asks for more than there are."""
    n = source.wanted(len(candidates)) if n is None else n
    if n is not None and n > len(candidates):
        raise ConfigError(f"data.sources.{name}: {source.dataset} has {len(candidates)} {what} in split "
                          f"{source.split!r} and the mix asks for {n} of them; lower its count (null takes all)")
    return Taken(name, source.dataset, source.split, len(candidates), choose(candidates, n, seed, name))


def mix_lineage(parts: Iterable[Taken]) -> dict[str, dict[str, Any]]:
    """{source name: what was taken from it}."""
    return {p.name: p.lineage() for p in parts}


def open_mix(parts: Sequence[Taken], storage: StorageConfig | None = None,
             cache_dir: str | None = None, on_error: OnError = "raise") -> IndexedMix:
    """The chosen samples of ``parts``, read map-style (an ``IndexedMix``), in part order then key order.
    ``on_error`` (``ReaderConfig``): with skip, samples of damaged or missing shards are left out and
    counted in the mix's ``skipped`` instead of stopping the job."""
    from sonosynth.datasets.indexed import IndexedMix, ShardDataset

    datasets = [ShardDataset(p.dataset, keys=p.keys, storage=storage, cache_dir=cache_dir, on_error=on_error)
                for p in parts]
    mix = IndexedMix([(ds, np.arange(len(ds))) for ds in datasets])
    expected = [k for p in parts for k in p.keys]
    if on_error != "skip" and mix.keys() != expected:
        missing = sorted(set(expected) - set(mix.keys()))
        raise ConfigError(f"{len(missing)} samples of the manifests are not in their datasets (e.g. {missing[:3]}); "
                          "re-run the stage that wrote them")
    return mix
