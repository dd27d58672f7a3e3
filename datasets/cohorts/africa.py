"""African fetal planes (Sendra-Balcells et al. 2023): Algeria, Egypt, Ghana, Malawi, Uganda.

Names ``patient{3 digits}_{DZA|EGY|GHA|MWI|UGA}_plane{0..3}.png`` (0 abdomen, 1 brain,
2 femur, 3 thorax). Patient numbers restart per centre, so the patient id is centre +
number. The CSV (``Patient_num, Plane, Train, Center, Image_name``) is optional; without
it plane, centre and patient come from the file name.
"""

from __future__ import annotations

import re
from pathlib import Path

from sonosynth.datasets.cohorts.base import (
    Cohort, CohortError, SourceRecord, find_images, int_or_none, label_error,
    need_column, official_split, read_index,
)
from sonosynth.datasets.labels import AFRICA_PLANE_CODES, normalize_plane

NAME = re.compile(r"^patient(?P<num>\d+)_(?P<cc>[A-Z]{3})_plane(?P<plane>\d+)$", re.IGNORECASE)
COUNTRIES = {"algeria": "DZA", "egypt": "EGY", "ghana": "GHA", "malawi": "MWI", "uganda": "UGA"}


class AfricanPlanes(Cohort):
    name = "africa"

    def __init__(self, src: str | Path, index: str | Path | None = None):
        self.src = Path(src)
        self.index = Path(index) if index else next(iter(sorted(self.src.glob("*.csv"))), None)

    def _record(self, image: Path | None, stem: str, raw_plane: str | None, country: str | None,
                num: int | None, split: str | None) -> SourceRecord:
        m = NAME.match(stem)
        if m:
            country = country or m["cc"].upper()
            num = num if num is not None else int(m["num"])
            if raw_plane is None:
                raw_plane = AFRICA_PLANE_CODES.get(int(m["plane"]))
        plane = normalize_plane(raw_plane)
        error = label_error(image, stem, self.src, plane, raw_plane)
        patient = f"africa-{country}-{num:03d}" if country and num is not None else None
        return SourceRecord(
            cohort=self.name, source_id=stem, image_path=str(image) if image else None,
            patient_id=patient, plane=plane, official_split=split,
            extra={"country": country} if country else {}, error=error,
        )

    def records(self) -> list[SourceRecord]:
        images = find_images(self.src)
        if self.index is None:
            found = [p for p in images if NAME.match(p.stem)]
            if not found:
                raise CohortError(f"no African plane images (patient001_EGY_plane0.png...) under {self.src}")
            return [self._record(p, p.stem, None, None, None, None) for p in found]
        rows = read_index(self.index)
        by_stem = {p.stem: p for p in images}
        ncol = need_column(rows, ("Image_name",), self.index)
        pcol = need_column(rows, ("Plane",), self.index)
        ccol = need_column(rows, ("Center", "Centre", "Country"), self.index)
        cols = {c.lower(): c for c in rows[0]}
        recs = []
        for row in rows:
            stem = Path(row[ncol]).stem if row[ncol].lower().endswith(".png") else row[ncol]
            centre = row[ccol].strip()
            country = COUNTRIES.get(centre.lower(), centre.upper()[:3] or None)
            num = int_or_none(row.get(cols.get("patient_num", ""), ""))
            recs.append(self._record(by_stem.get(stem), stem, row[pcol], country, num,
                                     official_split(row.get(cols.get("train", "")))))
        return recs
