"""What a classifier job trains and validates on: the training mix (``sonosynth.datasets.mix``)
with the classifier's labels, class balance and ratios on top, and a real validation split.
Pure planning over manifests (no image is read): every rank computes the same plan.

- **Sources** (``data.sources``, named; ``real`` is the one --dataset sets): datasets from
  ingest (FETAL_PLANES_DB, African, folder, phantom) or from generate (class mode), local or
  ``s3://``. Each takes all of its ``split``, exactly ``count`` samples or a ``fraction`` of
  them (the mix's seeded, nested choice; class-balanced on request: FU-LoRA's HB takes 1,150
  class-balanced real images; 0 leaves the source out), or ``ratio``: its share of the mix, the
  rest being the other sources (real 1,150 + synthetic at ratio 0.813 -> 5,000 synthetic).
- **Labels**: ``data.labels``, else the union of the training datasets' manifests' planes (all
  splits) less ``exclude_labels``. Samples of other planes, or with none, are left out and
  counted. A class a split lacks keeps its index.
- **Validation**: the ``val`` split of the real training datasets (or of
  ``validation.datasets``). A dataset without one is an error naming the fixes, unless
  ``validation.holdout`` moves that fraction of its training patients (seeded, patient-disjoint)
  to validation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import model_validator

from sonosynth.datasets.mix import Manifests, MixConfig, MixSource, Taken, check_validation_split, mix_lineage, take
from sonosynth.infra.config import Config, ConfigError
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.storage import StorageConfig
from sonosynth.trainers.classifier.data import LabelMap, class_balanced_keys

REAL = "real"
"""The conventional name of the source the CLI's --dataset sets (data.sources.real.dataset)."""


class DataSource(MixSource):
    """One training dataset and how much of it the mix takes."""

    ratio: float | None = None
    """Instead of count: this source's share of the mixed training set, in (0, 1); the rest is made
    of the other sources. E.g. 0.8 next to 1,150 real -> 4,600."""
    class_balanced: bool = False
    """Pick the samples class-balanced (equal shares; a short class gives all it has). Without count or
    ratio: as many of each class as the rarest one has."""

    @model_validator(mode="after")
    def _check_ratio(self) -> "DataSource":
        if self.ratio is not None and (self.count is not None or self.fraction is not None):
            raise ValueError(f"{self.dataset}: give count, fraction or ratio, not two of them")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ValueError(f"{self.dataset}: ratio must be in (0, 1), the source's share of the mix, e.g. 0.8")
        return self


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
        check_validation_split(self.split)
        return self


class ClassifierDataConfig(MixConfig):
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
    stats_images: int = 256
    """Training images the pixel mean and std of a randomly initialised model are estimated from
    (when model.pixel_mean is null); 0: the fixed 0.5 / 0.25."""

    @model_validator(mode="after")
    def _check(self) -> "ClassifierDataConfig":
        used = self.used_sources()
        ratios = sum(s.ratio or 0 for s in used.values())
        if ratios and (ratios >= 1 or all(s.ratio is not None for s in used.values())):
            raise ValueError("ratios are shares of the mix next to sources with a count (or all their "
                             "samples): they must sum below 1 and at least one source needs no ratio")
        if self.labels is not None and len(set(self.labels)) < 2:
            raise ValueError("data.labels needs at least 2 distinct classes (or null: from the manifests)")
        if self.stats_images < 0:
            raise ValueError("data.stats_images must be 0 or more")
        return self


@dataclass
class Part(Taken):
    """Chosen samples of one dataset, with their planes."""

    planes: dict[str, str]
    """key -> plane of every candidate."""

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.planes[k] for k in self.keys).items()))

    def lineage(self) -> dict[str, Any]:
        return {**super().lineage(), "per_class": self.counts()}


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
        return {"labels": list(self.labels.classes), "sources": mix_lineage(self.train),
                "validation": [p.lineage() for p in self.val], "left_out": self.left_out,
                "classes_without_training_samples": self.missing_train_classes}


def _holdout_patients(rows: list[dict[str, Any]], fraction: float, seed: int) -> set[str]:
    from sonosynth.datasets.splits import unit_hash

    patients = sorted({r.get("patient_id") or r["key"] for r in rows})
    return {p for p in patients if unit_hash(derive_seed("classifier-holdout", seed), p) < fraction}


def _take(name: str, s: DataSource, rows: list[dict[str, Any]], n: int | None, seed: int,
          labels: LabelMap) -> Part:
    planes = {r["key"]: r["plane"] for r in rows}
    if not s.class_balanced:
        return Part(**vars(take(name, s, list(planes), seed, n, what="usable samples")), planes=planes)
    counts = Counter(planes.values())
    n = min(counts.values()) * len(counts) if n is None else n
    try:
        keys = class_balanced_keys(rows, n, seed, classes=list(labels.classes), source=name)
    except ValueError:
        raise ConfigError(f"data.sources.{name} ({s.dataset}, split {s.split!r}): cannot pick {n} class-balanced "
                          f"samples from {len(rows)} ({dict(sorted(counts.items()))}); lower its count") from None
    return Part(name, s.dataset, s.split, len(rows), keys, planes)


def plan_data(cfg: ClassifierDataConfig, storage: StorageConfig | None = None) -> DataPlan:
    """The job's label map, training parts and validation parts, from the manifests alone."""
    manifests = Manifests(storage)
    sources = cfg.used_sources()
    if cfg.labels is not None:
        labels = LabelMap.from_classes(cfg.labels)
    else:
        found = {r.get("plane") for s in sources.values() for r in manifests.rows(s.dataset)}
        found -= {None, *cfg.exclude_labels}
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

    candidates = {name: manifests.source(name, s) for name, s in sources.items()}
    val, candidates = _validation(cfg, manifests, candidates, labels, usable)
    usable_rows = {name: usable(rows) for name, rows in candidates.items()}
    for name, rows in usable_rows.items():
        if not rows:
            raise ConfigError(f"data.sources.{name}: {sources[name].dataset} (split {sources[name].split!r}) has no "
                              f"sample of the classes {list(labels.classes)}")
    # Sources with a count (or all their samples) first; a ratio is a share of the mix they make.
    parts = {name: _take(name, s, usable_rows[name], s.wanted(len(usable_rows[name])), cfg.seed, labels)
             for name, s in sources.items() if s.ratio is None}
    fixed, share = sum(len(p.keys) for p in parts.values()), sum(s.ratio or 0 for s in sources.values())
    for name, s in sources.items():
        if s.ratio is not None:
            parts[name] = _take(name, s, usable_rows[name], round(fixed * s.ratio / (1 - share)), cfg.seed, labels)
    train = [parts[name] for name in sources]
    in_train = {p.planes[k] for p in train for k in p.keys}
    return DataPlan(labels, train, val, dict(sorted(left_out.items())),
                    [c for c in labels.classes if c not in in_train])


def _validation(cfg: ClassifierDataConfig, manifests: Manifests, candidates: dict[str, list[dict[str, Any]]],
                labels: LabelMap, usable) -> tuple[list[Part], dict[str, list[dict[str, Any]]]]:
    """The validation parts: the real training datasets' val split (or ``validation.datasets``'), or
    a patient holdout of a dataset's training rows, which then leave ``candidates``."""
    v, sources = cfg.validation, cfg.used_sources()
    if v.datasets is not None:
        val_uris = list(dict.fromkeys(v.datasets))
    else:
        val_uris = list(dict.fromkeys(s.dataset for s in sources.values()
                                      if any(r.get("source") != "synthetic" for r in manifests.rows(s.dataset))))
        if not val_uris:
            raise ConfigError("every training dataset is synthetic: name a real dataset with a val split in "
                              "data.validation.datasets (the best checkpoint is chosen on real images)")
    val: list[Part] = []
    for uri in val_uris:
        rows = manifests.split(uri, v.split)
        on_uri = [name for name, s in sources.items() if s.dataset == uri]
        split: str | None = v.split
        if rows:
            picked = usable(rows)
            role = f"validation ({v.split} split)"
        elif v.holdout is not None and on_uri:
            pool = [r for name in on_uri for r in candidates[name]]
            held = _holdout_patients(pool, v.holdout, cfg.seed)
            candidates = {name: [r for r in cand if name not in on_uri or (r.get("patient_id") or r["key"]) not in held]
                          for name, cand in candidates.items()}
            picked = usable({r["key"]: r for r in pool if (r.get("patient_id") or r["key"]) in held}.values())
            role, split = f"validation (holdout of {len(held)} training patients)", sources[on_uri[0]].split
            if not picked:
                raise ConfigError(f"validation.holdout={v.holdout} held out no usable sample of {uri}; raise it")
        else:
            raise ConfigError(
                f"{uri} has no {v.split!r} split to validate on (its splits: {manifests.describe_splits(uri)}); "
                f"re-ingest it with a val split (--set splits.val=0.1), or set data.validation.holdout=0.15 to "
                f"validate on held-out training patients, or data.validation.datasets=[DATASET] to validate on "
                f"another dataset")
        if not picked:
            raise ConfigError(f"{uri} split {v.split!r} has no sample of the classes {list(labels.classes)}")
        planes = {r["key"]: r["plane"] for r in picked}
        val.append(Part(role, uri, split, len(planes), sorted(planes), planes))
    return val, candidates
