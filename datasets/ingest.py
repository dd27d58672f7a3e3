"""``sonosynth ingest``: a real cohort (or the phantom) -> a sonosynth dataset.

DEST gets ``shards/<cohort>-%06d.tar``, ``manifest.parquet``, ``quarantine.jsonl``,
``split_report.json`` and the resolved ``config.yaml``. The work is planned as shard-sized
tasks with deterministic contents; each finished shard leaves a completion record, so a
re-run (after a crash, or to check) redoes only what is missing or changed and never
duplicates a sample. Inputs that cannot become samples go to quarantine with a reason.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import field_validator

from sonosynth.datasets.cohorts import Cohort, CohortConfig, InputError, SourceRecord, make_cohort
from sonosynth.datasets.cohorts.base import DUPLICATE_KEY
from sonosynth.datasets.geometry import FillMethod, MaskError, MaskRules, fill_mask
from sonosynth.datasets.manifest import manifest_row, write_manifest
from sonosynth.datasets.records import Sample
from sonosynth.datasets.shards import (
    SHARDS_DIR, ShardRecord, done_key, plan_hash, publish_shard, remove_stale, shard_key, split_completed,
)
from sonosynth.datasets.splits import SplitConfig, assign_splits, patient_of
from sonosynth.infra.config import Config
from sonosynth.infra.jobdir import claim_output
from sonosynth.infra.progress import Progress
from sonosynth.infra.stage import Report
from sonosynth.infra.storage import StorageConfig, open_storage

FORMAT_VERSION = 1
QUARANTINE = "quarantine.jsonl"
SPLIT_REPORT = "split_report.json"


class MaskConfig(MaskRules):
    """How annotation masks become filled training targets (and which are quarantined)."""

    fill: FillMethod = "ellipse"
    """ellipse: fit and fill an ellipse (head/abdomen outlines); holes: fill enclosed holes; none."""


class ShardConfig(Config):
    """How samples are packed into WebDataset shards."""

    max_samples: int = 256
    """Samples per shard (the unit of work, resumption and parallel reading)."""
    name: str | None = None
    """Shard base name (shards/<name>-000000.tar); default the cohort name."""

    @field_validator("max_samples")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1, e.g. --set shards.max_samples=256")
        return v


class IngestConfig(Config):
    """The ingest stage: read a cohort, fill masks, split, write shards and a manifest."""

    cohort: CohortConfig = CohortConfig()
    """Which cohort to read and from where."""
    out: str = "runs/dataset"
    """Destination dataset: a folder or s3://bucket/prefix."""
    strict: bool = False
    """Exit non-zero when any input is quarantined (outputs are still written)."""
    overwrite: bool = False
    """Allow writing into a DEST that holds an ingest of another cohort or source folder."""
    workers: int = 1
    """Processes that build shards in parallel."""
    mask: MaskConfig = MaskConfig()
    """How outline annotations become filled masks, and which masks are quarantined."""
    shards: ShardConfig = ShardConfig()
    """Shard size and name."""
    splits: SplitConfig = SplitConfig()
    """How samples are assigned to train/val/test (patient-disjoint)."""
    storage: StorageConfig = StorageConfig()
    """Retries and endpoint of the destination storage."""
    progress: bool = True
    """Show a progress bar."""

    def source_fingerprint(self) -> dict[str, Any] | None:
        """The source's listing fingerprint: part of a pipeline section's key (new data re-runs it)."""
        fp = self.cohort.source_fingerprint()
        return None if fp is None else asdict(fp)

    def job_identity(self) -> dict[str, Any]:
        """What makes another ingest job: another cohort or source (anything else resumes)."""
        return {"cohort.name": self.cohort.name, "cohort.src": self.cohort.src, "shards.name": self.shards.name}


@dataclass
class IngestReport:
    out: str
    ingested: int = 0
    quarantined: Counter = field(default_factory=Counter)
    shards: int = 0
    reused_shards: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    planes: dict[str, int] = field(default_factory=dict)
    leaking_patients: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        q = sum(self.quarantined.values())
        lines = [
            f"ingested {self.ingested} samples into {self.shards} shards at {self.out} "
            f"({self.reused_shards} shards already complete, {self.seconds:.1f}s)",
            "  splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()),
            "  planes: " + (", ".join(f"{k} {v}" for k, v in sorted(self.planes.items())) or "none"),
            f"  quarantined {q}" + (": " + ", ".join(f"{k} {v}" for k, v in self.quarantined.most_common())
                                    if q else "") + (f" (see {self.out}/{QUARANTINE})" if q else ""),
        ]
        if self.leaking_patients:
            lines.append(f"  WARNING: {self.leaking_patients} patients are in more than one split "
                         f"(see {self.out}/{SPLIT_REPORT})")
        return "\n".join(lines)


@dataclass
class ShardTask:
    cohort: Cohort
    records: list[SourceRecord]
    splits: dict[str, str]
    shard: str
    done: str
    plan: str
    mask: MaskConfig
    out: str
    storage: StorageConfig


def quarantine_row(rec: SourceRecord, reason: str, detail: str) -> dict[str, Any]:
    return {"key": rec.key, "cohort": rec.cohort, "source_id": rec.source_id,
            "image": rec.image_path, "mask": rec.mask_path, "reason": reason, "detail": detail}


def _sample(rec: SourceRecord, cohort: Cohort, split: str, mask_cfg: MaskConfig) -> Sample:
    image, raw_mask = cohort.load(rec)
    h, w = image.shape
    qc: dict[str, Any] = {}
    mask = None
    if raw_mask is not None:
        try:
            mask, figures = fill_mask(raw_mask, fill=mask_cfg.fill, **mask_cfg.fill_kwargs())
        except MaskError as err:
            raise InputError(err.reason, f"mask {rec.mask_path or rec.key}: {err}") from None
        qc = figures.as_row()
    meta = {"cohort": rec.cohort, "source": "real", "source_id": rec.source_id,
            "patient_id": patient_of(rec), "plane": rec.plane, "split": split,
            "official_split": rec.official_split, "pixel_size_mm": rec.pixel_size_mm,
            "width": w, "height": h, "has_mask": mask is not None, **qc, **rec.extra}
    return Sample(rec.key, image, mask, meta)


def build_shard(task: ShardTask) -> ShardRecord:
    """Load, check and pack one task's inputs; publish the shard, then its record."""
    storage = open_storage(task.out, task.storage)
    samples, rejected = [], []
    for rec in task.records:
        try:
            samples.append(_sample(rec, task.cohort, task.splits[rec.key], task.mask))
        except InputError as err:
            rejected.append(quarantine_row(rec, err.reason, str(err)))
    record = ShardRecord(shard=None, plan=task.plan, rejected=rejected)
    if samples:
        record.sha256, _ = publish_shard(storage, task.shard, samples)
        record.shard, record.num_samples = task.shard, len(samples)
        record.rows = [manifest_row(s, task.shard) for s in samples]
    else:
        storage.delete(task.shard)
    record.save(storage, task.done)
    return record


def _file_stamp(path: str | None) -> Any:
    if path is None:
        return None
    try:
        st = os.stat(path)
        return [st.st_size, int(st.st_mtime)]
    except OSError:
        return None


def plan_tasks(cohort: Cohort, records: list[SourceRecord], splits: dict[str, str],
               cfg: IngestConfig) -> list[ShardTask]:
    name = cfg.shards.name or cohort.name
    n = cfg.shards.max_samples
    settings = {"format": FORMAT_VERSION, "mask": cfg.mask.to_dict(),
                "phantom": cfg.cohort.phantom.to_dict() if cfg.cohort.name == "phantom" else None}
    tasks = []
    for i in range(0, len(records), n):
        chunk = records[i:i + n]
        shard = shard_key(name, i // n)
        payload = {"settings": settings, "inputs": [
            [r.key, r.image_path, _file_stamp(r.image_path), r.mask_path, _file_stamp(r.mask_path),
             splits[r.key], r.plane, r.patient_id, r.pixel_size_mm, r.extra] for r in chunk]}
        tasks.append(ShardTask(cohort, chunk, {r.key: splits[r.key] for r in chunk}, shard,
                               done_key(shard), plan_hash(payload), cfg.mask, cfg.out, cfg.storage))
    return tasks


def run_ingest(cfg: IngestConfig, progress: bool | None = None) -> IngestReport:
    progress = cfg.progress if progress is None else progress
    start = time.monotonic()
    storage = open_storage(cfg.out, cfg.storage)
    claim_output(storage, stage="ingest", identity=cfg.job_identity(), config_yaml=cfg.to_yaml(),
                 overwrite=cfg.overwrite, foreign_marker=f"{SHARDS_DIR}/")
    cohort = make_cohort(cfg.cohort)
    records = sorted(cohort.records(), key=lambda r: r.key)

    quarantine: list[dict[str, Any]] = []
    good: list[SourceRecord] = []
    first_seen: dict[str, SourceRecord] = {}
    for rec in records:
        if rec.key in first_seen:
            other = first_seen[rec.key]
            quarantine.append(quarantine_row(rec, DUPLICATE_KEY, (
                f"{rec.image_path or rec.source_id} has key {rec.key!r}, already used by "
                f"{other.image_path or other.source_id}; rename one of them")))
        elif rec.error:
            first_seen[rec.key] = rec
            quarantine.append(quarantine_row(rec, *rec.error))
        else:
            first_seen[rec.key] = rec
            good.append(rec)

    splits, split_report = assign_splits(good, cfg.splits)
    tasks = plan_tasks(cohort, good, splits, cfg)
    report = IngestReport(out=storage.uri)
    finished, todo = split_completed(storage, tasks, done=lambda t: t.done, plan=lambda t: t.plan)
    results: list[ShardRecord] = list(finished.values())
    report.reused_shards = len(finished)

    bar = Progress(len(good), f"ingest {cohort.name}", "img", enabled=progress,
                   initial=sum(len(t.records) for t in tasks) - sum(len(t.records) for t in todo))
    try:
        if cfg.workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
                futures = {pool.submit(build_shard, t): t for t in todo}
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update(len(futures[fut].records))
        else:
            for task in todo:
                results.append(build_shard(task))
                bar.update(len(task.records))
    finally:
        bar.close()

    rows = [row for r in results for row in r.rows]
    quarantine += [row for r in results for row in r.rejected]
    quarantine.sort(key=lambda q: (q["key"], q["reason"]))
    write_manifest(storage, rows)
    storage.put_text(QUARANTINE, "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine))
    storage.put_text(SPLIT_REPORT, json.dumps(split_report, indent=1, sort_keys=True))
    remove_stale(storage, cfg.shards.name or cohort.name, {t.shard for t in tasks})

    report.ingested = len(rows)
    report.quarantined = Counter(q["reason"] for q in quarantine)
    report.shards = sum(1 for r in results if r.shard)
    report.splits = {s: sum(1 for row in rows if row["split"] == s) for s in ("train", "val", "test")}
    report.planes = dict(Counter(row["plane"] or "unlabelled" for row in rows))
    report.leaking_patients = split_report["leaking_patients"]
    report.seconds = time.monotonic() - start
    return report


def run(cfg: IngestConfig) -> Report:
    """The ingest stage: fails (exit 1) when nothing was ingested, or with ``strict`` when
    anything was quarantined; the outputs are written either way."""
    r = run_ingest(cfg)
    failed = None
    if r.ingested == 0:
        failed = "nothing was ingested; see the quarantine reasons above"
    elif cfg.strict and r.quarantined:
        failed = "strict is on and some inputs were quarantined"
    out = r.out.rstrip("/")
    return Report(
        stage="ingest", out=r.out, text=r.summary(), failed=failed,
        figures={"ingested": r.ingested, "quarantined": dict(r.quarantined), "shards": r.shards,
                 "reused_shards": r.reused_shards, "splits": r.splits, "planes": r.planes,
                 "leaking_patients": r.leaking_patients, "seconds": r.seconds},
        outputs={"dataset": r.out, "manifest": f"{out}/manifest.parquet", "quarantine": f"{out}/{QUARANTINE}"})
