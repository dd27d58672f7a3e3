"""FETAL_PLANES_DB (Spanish fetal planes; Burgos-Artizzu et al. 2020).

Names ``Patient{5 digits}_Plane{k}_{i}_of_{n}.png``. With an index CSV (``;`` or ``,``
separated, BOM and padded headers tolerated) the rows list the images and their
``Plane`` (or ``category``), ``Patient_num`` and ``Train``; rows whose image is not under
SRC are quarantined as image_missing. Without one, every image under SRC is taken and the
plane and patient come from the name. Head masks (``_Annotation``), where present, are used.
"""

from __future__ import annotations

import re
from pathlib import Path

from sonosynth.datasets.cohorts.base import (
    Cohort, CohortError, SourceRecord, annotation_for, find_images,
    int_or_none, label_error, need_column, official_split, read_index,
)
from sonosynth.datasets.labels import FPDB_PLANE_CODES, normalize_plane

NAME = re.compile(r"^Patient(?P<patient>\d+)_Plane(?P<plane>\d+)_", re.IGNORECASE)


def _patient(num: int | None) -> str | None:
    return f"fpdb-{num:05d}" if num is not None else None


class FetalPlanesDB(Cohort):
    name = "fpdb"

    def __init__(self, src: str | Path, index: str | Path | None = None):
        self.src = Path(src)
        self.index = Path(index) if index else None

    def _record(self, image: Path | None, stem: str, raw_plane: str | None, patient: str | None,
                split: str | None, extra: dict) -> SourceRecord:
        m = NAME.match(stem)
        if raw_plane is None and m:
            raw_plane = FPDB_PLANE_CODES.get(int(m["plane"]))
        plane = normalize_plane(raw_plane)
        if patient is None and m:
            patient = _patient(int(m["patient"]))
        error = label_error(image, stem, self.src, plane, raw_plane)
        mask = annotation_for(image, self.src) if image is not None else None
        return SourceRecord(
            cohort=self.name, source_id=stem, image_path=str(image) if image else None,
            mask_path=str(mask) if mask else None, patient_id=patient, plane=plane,
            official_split=split, extra=extra, error=error,
        )

    def records(self) -> list[SourceRecord]:
        images = [p for p in find_images(self.src)]
        if self.index is None:
            found = [p for p in images if NAME.match(p.stem)]
            if not found:
                raise CohortError(f"no FETAL_PLANES_DB images (Patient00001_Plane1_1_of_15.png...) "
                                  f"under {self.src}")
            return [self._record(p, p.stem, None, None, None, {}) for p in found]
        rows = read_index(self.index)
        by_stem = {p.stem: p for p in images}
        ncol = need_column(rows, ("Image_name", "image", "filename"), self.index)
        pcol = need_column(rows, ("Plane", "category", "label"), self.index)
        cols = {c.lower(): c for c in rows[0]} if rows else {}
        recs = []
        for row in rows:
            stem = Path(row[ncol]).stem if row[ncol].lower().endswith(".png") else row[ncol]
            num = int_or_none(row.get(cols.get("patient_num", ""), "")) if "patient_num" in cols else None
            extra = {k: row[cols[k.lower()]] for k in ("Brain_plane", "Operator", "US_Machine")
                     if k.lower() in cols}
            recs.append(self._record(by_stem.get(stem), stem, row[pcol], _patient(num),
                                     official_split(row.get(cols.get("train", ""))), extra))
        return recs
