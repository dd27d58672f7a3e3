"""Patient-disjoint train/val/test assignment, seeded and stable, with a leak report.

``hash``: each patient's split is a function of (seed, patient id) alone, so adding images
or patients never moves an existing patient. ``cohort``: the cohort's own train/test
column decides test, and its train side is split into train/val by patient hash.
``file``: a CSV (columns ``key`` or ``source_id``, and ``split``) decides; unlisted samples
fall back to the hash. With ``cohort`` and ``file`` a patient can land on both sides: that
is reported as a leak (the report lists patients, splits and keys), never silently fixed.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Literal

from pydantic import model_validator

from sonosynth.datasets.cohorts.base import CohortError, SourceRecord, read_index
from sonosynth.infra.config import Config

SPLITS = ("train", "val", "test")


class SplitConfig(Config):
    """How samples are assigned to train/val/test."""

    source: Literal["hash", "cohort", "file"] = "hash"
    """hash: by patient hash; cohort: the cohort's own train/test column; file: a split CSV."""
    val: float = 0.1
    """Fraction of patients in val (hash; and of the train side with cohort)."""
    test: float = 0.1
    """Fraction of patients in test (hash only)."""
    seed: int = 0
    """Seed of the patient hash."""
    file: str | None = None
    """CSV with columns key (or source_id) and split, for source=file."""

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise ValueError(f"val={self.val} and test={self.test} must be in [0, 1) and sum below 1")
        if self.source == "file" and not self.file:
            raise ValueError("source=file needs splits.file=PATH.csv (columns key or source_id, split)")
        return self


def patient_of(rec: SourceRecord) -> str:
    """The patient id, or the sample key when the cohort does not say (one image, one patient)."""
    return rec.patient_id or rec.key


def unit_hash(seed: int, patient: str) -> float:
    digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(patient: str, cfg: SplitConfig, test: float | None = None) -> str:
    u = unit_hash(cfg.seed, patient)
    test = cfg.test if test is None else test
    if u < test:
        return "test"
    if u < test + cfg.val:
        return "val"
    return "train"


def _file_splits(path: str) -> dict[str, str]:
    rows = read_index(path)
    if not rows:
        return {}
    cols = {c.lower(): c for c in rows[0]}
    ident = cols.get("key") or cols.get("source_id")
    split = cols.get("split")
    if not ident or not split:
        raise CohortError(f"split file {path} needs columns key (or source_id) and split")
    out = {}
    for row in rows:
        value = row[split].strip().lower()
        if value not in SPLITS:
            raise CohortError(f"split file {path}: split {row[split]!r} for {row[ident]!r} is not "
                              f"one of {', '.join(SPLITS)}")
        out[row[ident]] = value
    return out


def assign_splits(records: list[SourceRecord], cfg: SplitConfig) -> tuple[dict[str, str], dict]:
    """({sample key: split}, report). The report counts splits and lists leaking patients."""
    listed = _file_splits(cfg.file) if cfg.source == "file" else {}
    splits: dict[str, str] = {}
    unlisted = 0
    for rec in records:
        patient = patient_of(rec)
        if cfg.source == "file" and (rec.key in listed or rec.source_id in listed):
            splits[rec.key] = listed.get(rec.key) or listed[rec.source_id]
        elif cfg.source == "cohort" and rec.official_split == "test":
            splits[rec.key] = "test"
        elif cfg.source == "cohort":
            splits[rec.key] = hash_split(patient, cfg, test=0.0)
        else:
            unlisted += cfg.source == "file"
            splits[rec.key] = hash_split(patient, cfg)
    by_patient: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        by_patient[patient_of(rec)][splits[rec.key]].append(rec.key)
    leaks = [{"patient_id": p, "splits": {s: sorted(k) for s, k in sides.items()}}
             for p, sides in sorted(by_patient.items()) if len(sides) > 1]
    counts = {s: sum(1 for v in splits.values() if v == s) for s in SPLITS}
    report = {"source": cfg.source, "seed": cfg.seed, "counts": counts,
              "patients": len(by_patient), "leaking_patients": len(leaks), "leaks": leaks}
    if cfg.source == "file":
        report["not_in_file"] = unlisted
    return splits, report
