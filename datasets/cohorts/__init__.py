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
from sonosynth.infra.config import Config

CohortName = Literal["hc18", "fpdb", "africa", "folder", "phantom"]


class CohortConfig(Config):
    """Which real (or phantom) cohort to read, and from where."""

    name: CohortName = "phantom"
    """Adapter: hc18, fpdb (FETAL_PLANES_DB), africa (African planes), folder, phantom."""
    src: str | None = None
    """Folder holding the cohort's images (not used by phantom)."""
    index: str | None = None
    """The cohort's index CSV (fpdb, africa, folder labels; hc18 pixel sizes)."""
    phantom: PhantomConfig = PhantomConfig()
    """Phantom settings, used when name is phantom."""

    @model_validator(mode="after")
    def _src_needed(self) -> "CohortConfig":
        if self.name != "phantom" and not self.src:
            raise ValueError(f"cohort {self.name!r} reads a folder: pass --src DIR "
                             "(or set cohort.src in the recipe)")
        return self


def make_cohort(cfg: CohortConfig) -> Cohort:
    if cfg.name == "phantom":
        return PhantomCohort(cfg.phantom)
    adapters = {"hc18": HC18, "fpdb": FetalPlanesDB, "africa": AfricanPlanes, "folder": ImageMaskFolder}
    return adapters[cfg.name](cfg.src, cfg.index)


__all__ = ["Cohort", "CohortConfig", "CohortError", "InputError", "SourceRecord", "make_cohort"]
