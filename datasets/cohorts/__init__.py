"""Cohort adapters: each turns a dataset's on-disk layout into SourceRecords."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from sonosynth.datasets.cohorts.africa import AfricanPlanes
from sonosynth.datasets.cohorts.base import Cohort, CohortError, InputError, SourceRecord
from sonosynth.datasets.cohorts.folder import ImageMaskFolder
from sonosynth.datasets.cohorts.fpdb import FetalPlanesDB
from sonosynth.datasets.cohorts.hc18 import HC18
from sonosynth.datasets.cohorts.phantom import PhantomCohort
from sonosynth.datasets.phantom import PhantomConfig
from sonosynth.datasets.source import FingerprintMode, SourceFingerprint, fingerprint, mirror
from sonosynth.infra.config import Config

CohortName = Literal["hc18", "fpdb", "africa", "folder", "phantom"]


class CohortConfig(Config):
    """Which real (or phantom) cohort to read, and from where."""

    name: CohortName = "phantom"
    """Adapter: hc18, fpdb (FETAL_PLANES_DB), africa (African planes), folder, phantom."""
    src: str | None = None
    """Folder or s3://bucket/prefix holding the cohort's images (not used by phantom); an
    s3:// source is mirrored into cache_dir and read from there."""
    index: str | None = None
    """The cohort's index CSV, a path or s3:// object (fpdb, africa, folder labels; hc18 pixel sizes)."""
    fingerprint: FingerprintMode = "stat"
    """How the pipeline tells that the source changed: stat (names, sizes, S3 ETags or local
    modification times) or content (SHA-256 of every local file; survives copying the folder)."""
    cache_dir: str | None = None
    """Local mirror of s3:// sources (default ~/.cache/sonosynth/sources)."""
    phantom: PhantomConfig = PhantomConfig()
    """Phantom settings, used when name is phantom."""

    @model_validator(mode="after")
    def _src_needed(self) -> "CohortConfig":
        if self.name != "phantom" and not self.src:
            raise ValueError(f"cohort {self.name!r} reads a folder: pass --src DIR "
                             "(or set cohort.src in the recipe)")
        return self

    def source_fingerprint(self) -> SourceFingerprint | None:
        """What the source holds now (None for the phantom, which has no source)."""
        if self.name == "phantom":
            return None
        return fingerprint([self.src] + ([self.index] if self.index else []), self.fingerprint)


def make_cohort(cfg: CohortConfig) -> Cohort:
    if cfg.name == "phantom":
        return PhantomCohort(cfg.phantom)
    adapters = {"hc18": HC18, "fpdb": FetalPlanesDB, "africa": AfricanPlanes, "folder": ImageMaskFolder}
    src = str(mirror(cfg.src, cfg.cache_dir))
    index = str(mirror(cfg.index, cfg.cache_dir)) if cfg.index else None
    return adapters[cfg.name](src, index)


__all__ = ["Cohort", "CohortConfig", "CohortError", "InputError", "SourceRecord", "make_cohort"]
