"""HC18 grand challenge (fetal head, ellipse outline annotations).

Layouts: the official ``training_set/NNN_HC.png`` + ``NNN_HC_Annotation.png`` in one folder,
or ``image/`` + ``mask/`` folders. ``NNN_2HC.png`` is a second scan of fetus NNN, so the
patient id is NNN. ``training_set_pixel_size_and_HC.csv`` (found in SRC, or --index) gives
pixel size and head circumference in mm.
"""

from __future__ import annotations

import re
from pathlib import Path

from sonosynth.datasets.cohorts.base import (
    MASK_MISSING, Cohort, CohortError, SourceRecord, annotation_for, find_images, need_column,
    read_index,
)

NAME = re.compile(r"^(?P<num>\d+)_(?P<rep>\d*)HC$", re.IGNORECASE)
PIXEL_CSV = "training_set_pixel_size_and_HC.csv"


class HC18(Cohort):
    name = "hc18"
    has_masks = True

    def __init__(self, src: str | Path, index: str | Path | None = None, require_masks: bool = True):
        self.src = Path(src)
        self.index = Path(index) if index else next(iter(sorted(self.src.rglob(PIXEL_CSV))), None)
        self.require_masks = require_masks

    def _pixel_sizes(self) -> dict[str, tuple[float | None, float | None]]:
        if self.index is None:
            return {}
        rows = read_index(self.index)
        fcol = need_column(rows, ("filename",), self.index)
        pcol = need_column(rows, ("pixel size(mm)", "pixel size (mm)", "pixel_size_mm"), self.index)
        hcols = [c for c in rows[0] if c.lower().startswith("head circumference")] if rows else []
        out = {}
        for row in rows:
            stem = Path(row[fcol]).stem
            hc = float(row[hcols[0]]) if hcols and row.get(hcols[0]) else None
            out[stem] = (float(row[pcol]) if row.get(pcol) else None, hc)
        return out

    def records(self) -> list[SourceRecord]:
        sizes = self._pixel_sizes()
        images = [p for p in find_images(self.src) if NAME.match(p.stem)]
        if not images:
            raise CohortError(f"no HC18 images (NNN_HC.png, NNN_2HC.png...) under {self.src}")
        recs = []
        for image in images:
            m = NAME.match(image.stem)
            mask = annotation_for(image, self.src)
            pixel, hc = sizes.get(image.stem, (None, None))
            error = None
            if mask is None and self.require_masks:
                error = (MASK_MISSING, f"no {image.stem}_Annotation.png beside {image} or in mask/")
            recs.append(SourceRecord(
                cohort=self.name, source_id=image.stem, image_path=str(image),
                mask_path=str(mask) if mask else None, mask_expected=self.require_masks,
                patient_id=f"hc18-{int(m['num']):03d}", plane="brain", pixel_size_mm=pixel,
                extra={"hc_mm": hc} if hc is not None else {}, error=error,
            ))
        return recs
