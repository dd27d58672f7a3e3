"""What a classifier job trains and validates on: sources mixed by count or ratio, one label map,
a real validation split. Pure planning over manifests (no image is read): every rank computes
the same plan.

- **Sources** (``data.sources``, named; ``real`` is the one --dataset sets): datasets from
  ingest (FETAL_PLANES_DB, African, folder, phantom) or from generate (class mode), local or
  ``s3://``. Each takes all of its ``split``, exactly ``count`` samples (a seeded choice,
  class-balanced on request: FU-LoRA's HB takes 1,150 class-balanced real images; 0 leaves the
  source out), or ``ratio``: its share of the mix, the rest being the sources with a count
  (real 1,150 + synthetic at ratio 0.813 -> 5,000 synthetic).
- **Labels**: ``data.labels``, else the union of the training datasets' manifests' planes (all
  splits) less ``exclude_labels``. Samples of other planes, or with none, are left out and
  counted. A class a split lacks keeps its index.
- **Validation**: the ``val`` split of the real training datasets (or of
  ``validation.datasets``). A dataset without one is an error naming the fixes, unless
  ``validation.holdout`` moves that fraction of its training patients (seeded, patient-disjoint)
  to validation.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import model_validator

from sonosynth.infra.config import Config, ConfigError
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.storage import StorageConfig
from sonosynth.trainers.classifier.data import LabelMap, class_balanced_keys


REAL = "real"
"""The conventional name of the source the CLI's --dataset sets (data.sources.real.dataset)."""


class DataSource(Config):
    """One training dataset and how much of it the mix takes."""

    dataset: str
    """Dataset folder or s3:// prefix, from `sonosynth ingest` or `sonosynth generate` (class mode)."""
    split: str | None = "train"
    """Take samples of this split (null: every split; a generated dataset is all 'train')."""
    count: int | None = None
    """Exactly this many samples (seeded choice); null: all of them (or ratio); 0 leaves the source out."""
    ratio: float | None = None
    """Instead of count: this source's share of the mixed training set, in (0, 1); the rest is made
    of the sources with a count (or all their samples). E.g. 0.8 next to 1,150 real -> 4,600."""
    class_balanced: bool = False
    """Pick the samples class-balanced (equal shares; a short class gives all it has). Without count or
    ratio: as many of each class as the rarest one has."""

    @model_validator(mode="after")
    def _check(self) -> "DataSource":
        if not self.dataset.strip():
            raise ValueError("dataset is empty; give a dataset folder or s3:// prefix")
        if self.count is not None and self.ratio is not None:
            raise ValueError(f"{self.dataset}: give count or ratio, not both")
        if self.count is not None and self.count < 0:
            raise ValueError(f"{self.dataset}: count must be 0 or more (0 leaves the source out; null: all)")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ValueError(f"{self.dataset}: ratio must be in (0, 1), the source's share of the mix, e.g. 0.8")
        if self.split == "test":
            raise ValueError("training on the test split would leak it into the scores; use split train "
                             "(score the model on test with `sonosynth evaluate`)")
        return self

    @property
    def used(self) -> bool:
        return self.count != 0


class ValidationConfig(Config):
    """The real validation split the best checkpoint is chosen on (never the test split)."""

    datasets: list[str] | None = None
    """Validate on these datasets; null: the real (not generated) training datasets."""
    split: str = "val"
    """Their split to validate on ('test' is refused: selecting on it inflates its scores)."""
    holdout: float | None = None
    """A training dataset with no samples in `split`: validate on this fraction of its training
    patients instead (seeded by data.seed, patient-disjoint; they leave the training set).
    Null: such a dataset is an error."""

    @model_validator(mode="after")
    def _check(self) -> "ValidationConfig":
        if self.holdout is not None and not 0 < self.holdout < 1:
            raise ValueError("validation.holdout must be in (0, 1), e.g. 0.15, or null")
        if self.datasets is not None and not self.datasets:
            raise ValueError("validation.datasets is empty; list datasets or use null (the real training datasets)")
        if self.split == "test":
            raise ValueError("the checkpoint is chosen on the validation split, so it must not be test; use val")
        return self


class ClassifierDataConfig(Config):
    """Training sources, the label map and the validation split."""

    sources: dict[str, DataSource] = {}
    """Named training datasets and how much of each, e.g. {real: {dataset: runs/fpdb, count: 1150,
    class_balanced: true}, synthetic: {dataset: runs/syn-planes, count: 5000}}. The CLI's --dataset
    sets sources.real.dataset; --set data.sources.synthetic.count=0 leaves a source out."""
    validation: ValidationConfig = ValidationConfig()
    """Validation split (checkpoint selection)."""
    labels: list[str] | None = None
    """The job's classes; null: every plane in the training datasets' manifests, less exclude_labels.
    Samples of other planes are left out (and counted in the lineage)."""
    exclude_labels: list[str] = []
    """Planes left out of a derived label map (FU-LoRA: [cervix])."""
    seed: int = 0
    """Seed of the count, ratio and class-balanced choices and of validation.holdout."""
    stats_images: int = 256
    """Training images the pixel mean and std of a randomly initialised model are estimated from
    (when model.pixel_mean is null); 0: the fixed 0.5 / 0.25."""
    cache_dir: str | None = None
    """Local folder for s3:// shards (null: $SONOSYNTH_CACHE_DIR or ~/.cache/sonosynth/shards)."""

    @model_validator(mode="after")
    def _check(self) -> "ClassifierDataConfig":
        used = self.used_sources()
        if not used:
            raise ValueError("no training data: pass --dataset DS (data.sources.real.dataset), or list "
                             "data.sources (a source with count 0 is left out)")
        ratios = sum(s.ratio or 0 for s in used.values())
        if ratios and (ratios >= 1 or all(s.ratio is not None for s in used.values())):
            raise ValueError("ratios are shares of the mix next to sources with a count (or all their "
                             "samples): they must sum below 1 and at least one source needs no ratio")
        if self.labels is not None and len(set(self.labels)) < 2:
            raise ValueError("data.labels needs at least 2 distinct classes (or null: from the manifests)")
        if self.stats_images < 0:
            raise ValueError("data.stats_images must be 0 or more")
        return self

    def used_sources(self) -> dict[str, DataSource]:
        """The sources the mix takes from (count 0 leaves one out), in order."""
        return {name: s for name, s in self.sources.items() if s.used}


@dataclass
class Part:
    """Chosen samples of one dataset."""

    dataset: str
    keys: list[str]
    """Sorted sample keys."""
    planes: dict[str, str]
    """key -> plane."""
    role: str
    """What this part is: 'source 0', 'validation', ..."""

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.planes[k] for k in self.keys).items()))

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "role": self.role, "samples": len(self.keys), "per_class": self.counts()}


@dataclass
class DataPlan:
    labels: LabelMap
    train: list[Part]
    val: list[Part]
    left_out: dict[str, int] = field(default_factory=dict)
    """Why samples of the chosen splits are not used -> how many."""
    missing_train_classes: list[str] = field(default_factory=list)
    """Classes of the label map with no training sample."""

    def train_labels(self) -> list[int]:
        return [self.labels.index(p.planes[k], k) for p in self.train for k in p.keys]

    def lineage(self) -> dict[str, Any]:
        return {"labels": list(self.labels.classes), "train": [p.describe() for p in self.train],
                "validation": [p.describe() for p in self.val], "left_out": self.left_out,
                "classes_without_training_samples": self.missing_train_classes}


def _manifest_rows(uri: str, storage: StorageConfig | None) -> list[dict[str, Any]]:
    from sonosynth.datasets.manifest import read_manifest
    from sonosynth.infra.storage import StorageError, open_storage

    try:
        table = read_manifest(open_storage(uri, storage))
    except (StorageError, FileNotFoundError) as err:
        raise ConfigError(f"cannot read the dataset {uri} ({str(err).splitlines()[0][:200]}); give a dataset "
                          "written by `sonosynth ingest` or `sonosynth generate` (a folder or s3:// prefix "
                          "holding manifest.parquet)") from None
    cols = ("key", "plane", "split", "patient_id", "source")
    data = table.select([c for c in cols if c in table.column_names]).to_pydict()
    return [dict(zip(data, values)) for values in zip(*data.values())]


def _split_counts(rows: list[dict[str, Any]]) -> str:
    counts = Counter(r.get("split") for r in rows)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))) or "empty"


def _holdout_patients(rows: list[dict[str, Any]], fraction: float, seed: int) -> set[str]:
    from sonosynth.datasets.splits import unit_hash

    patients = sorted({r.get("patient_id") or r["key"] for r in rows})
    return {p for p in patients if unit_hash(derive_seed("classifier-holdout", seed), p) < fraction}


def _choose(rows: list[dict[str, Any]], n: int | None, balanced: bool, seed: int, labels: LabelMap,
            where: str) -> list[str]:
    keys = sorted(r["key"] for r in rows)
    if balanced:
        counts = Counter(r["plane"] for r in rows)
        if n is None:
            n = min(counts.values()) * len(counts) if counts else 0
        try:
            return class_balanced_keys(rows, n, seed, classes=list(labels.classes))
        except ValueError:
            raise ConfigError(f"{where}: cannot pick {n} class-balanced samples from {len(rows)} "
                              f"({dict(sorted(counts.items()))}); lower its count") from None
    if n is None:
        return keys
    if n > len(keys):
        raise ConfigError(f"{where} has {len(keys)} usable samples and its count (or ratio) asks for {n}; "
                          "lower it")
    return sorted(random.Random(seed).sample(keys, n))


def plan_data(cfg: ClassifierDataConfig, storage: StorageConfig | None = None) -> DataPlan:
    """The job's label map, training parts and validation parts, from the manifests alone."""
    manifests: dict[str, list[dict[str, Any]]] = {}

    def rows_of(uri: str) -> list[dict[str, Any]]:
        if uri not in manifests:
            manifests[uri] = _manifest_rows(uri, storage)
        return manifests[uri]

    sources = cfg.used_sources()
    names, specs = list(sources), list(sources.values())
    for s in specs:
        rows_of(s.dataset)
    if cfg.labels is not None:
        labels = LabelMap.from_classes(cfg.labels)
    else:
        found = {r.get("plane") for s in specs for r in rows_of(s.dataset)} - {None} - set(cfg.exclude_labels)
        if len(found) < 2:
            raise ConfigError(f"the training datasets hold the planes {sorted(found)}: a classifier needs at least "
                              "2 (ingest a cohort with plane labels, or set data.labels)")
        labels = LabelMap.from_classes(found)
    left_out: Counter = Counter()

    def usable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in rows:
            if r.get("plane") is None:
                left_out["no plane label"] += 1
            elif r["plane"] not in labels:
                left_out[f"plane {r['plane']} not in the label map"] += 1
        return [r for r in rows if r.get("plane") in labels]

    # Candidates of each source: its split, usable labels.
    candidates = [[r for r in rows_of(s.dataset) if s.split is None or r.get("split") == s.split] for s in specs]
    for name, s, cand in zip(names, specs, candidates):
        if not cand:
            raise ConfigError(f"data.sources.{name}: {s.dataset} has no samples in split {s.split!r} (its splits: "
                              f"{_split_counts(rows_of(s.dataset))}); set data.sources.{name}.split")

    # Validation: the real training datasets' val split, or a patient holdout of their training rows.
    v = cfg.validation
    if v.datasets is not None:
        val_uris = list(dict.fromkeys(v.datasets))
    else:
        val_uris = list(dict.fromkeys(s.dataset for s in specs
                                      if any(r.get("source") != "synthetic" for r in rows_of(s.dataset))))
        if not val_uris:
            raise ConfigError("every training dataset is synthetic: name a real dataset with a val split in "
                              "data.validation.datasets (the best checkpoint is chosen on real images)")
    val: list[Part] = []
    for uri in val_uris:
        rows = [r for r in rows_of(uri) if r.get("split") == v.split]
        if rows:
            picked = usable(rows)
            role = f"validation ({v.split} split)"
        elif v.holdout is not None and any(s.dataset == uri for s in specs):
            pool = [r for s, cand in zip(specs, candidates) if s.dataset == uri for r in cand]
            held = _holdout_patients(pool, v.holdout, cfg.seed)
            candidates = [[r for r in cand if s.dataset != uri or (r.get("patient_id") or r["key"]) not in held]
                          for s, cand in zip(specs, candidates)]
            picked = usable({r["key"]: r for r in pool if (r.get("patient_id") or r["key"]) in held}.values())
            role = f"validation (holdout of {len(held)} training patients)"
            if not picked:
                raise ConfigError(f"validation.holdout={v.holdout} held out no usable sample of {uri}; raise it")
        else:
            raise ConfigError(
                f"{uri} has no {v.split!r} split to validate on (its splits: {_split_counts(rows_of(uri))}); "
                f"re-ingest it with a val split (--set splits.val=0.1), or set data.validation.holdout=0.15 to "
                f"validate on held-out training patients, or data.validation.datasets=[DATASET] to validate "
                f"on another dataset")
        if not picked:
            raise ConfigError(f"{uri} split {v.split!r} has no sample of the classes {list(labels.classes)}")
        val.append(Part(uri, sorted(r["key"] for r in picked), {r["key"]: r["plane"] for r in picked}, role))

    # Training parts: counts first, then ratios of the total they make.
    usable_rows = [usable(cand) for cand in candidates]
    for name, s, rows in zip(names, specs, usable_rows):
        if not rows:
            raise ConfigError(f"data.sources.{name}: {s.dataset} (split {s.split!r}) has no sample of the classes "
                              f"{list(labels.classes)}")
    where = [f"data.sources.{name} ({s.dataset}, split {s.split!r})" for name, s in zip(names, specs)]
    fixed = sum(len(_choose(rows, s.count, s.class_balanced, 0, labels, w))
                for s, rows, w in zip(specs, usable_rows, where) if s.ratio is None)
    share = sum(s.ratio or 0 for s in specs)
    train: list[Part] = []
    for name, s, rows, w in zip(names, specs, usable_rows, where):
        n = s.count if s.ratio is None else round(fixed * s.ratio / (1 - share))
        keys = _choose(rows, n, s.class_balanced, derive_seed("classifier-source", cfg.seed, name), labels, w)
        train.append(Part(s.dataset, keys, {r["key"]: r["plane"] for r in rows}, f"source {name}"))
    in_train = {p.planes[k] for p in train for k in p.keys}
    return DataPlan(labels, train, val, dict(sorted(left_out.items())),
                    [c for c in labels.classes if c not in in_train])
