"""A generic folder: ``SRC/image/*.png`` and, when present, ``SRC/mask/*.png``.

A mask is ``mask/<stem>.png`` or ``mask/<stem>_Annotation.png``. When ``mask/`` exists,
every image needs one (else mask_missing). An optional index CSV adds labels: columns
``image`` (file name), and any of ``plane``, ``patient_id``, ``split`` (train/test).
Without ``image/``, images are taken from SRC itself.
"""

from __future__ import annotations

from pathlib import Path

from sonosynth.datasets.cohorts.base import (
    MASK_MISSING, UNKNOWN_LABEL, Cohort, CohortError, SourceRecord, annotation_for, find_images,
    need_column, official_split, read_index,
)
from sonosynth.datasets.labels import normalize_plane


class ImageMaskFolder(Cohort):
    name = "folder"

    def __init__(self, src: str | Path, index: str | Path | None = None, name: str = "folder"):
        self.src = Path(src)
        self.index = Path(index) if index else None
        self.name = name

    def records(self) -> list[SourceRecord]:
        image_dir = self.src / "image" if (self.src / "image").is_dir() else self.src
        images = find_images(image_dir)
        if not images:
            raise CohortError(f"no images under {image_dir}; expected {self.src}/image/*.png")
        has_masks = (self.src / "mask").is_dir()
        labels: dict[str, dict[str, str]] = {}
        if self.index is not None:
            rows = read_index(self.index)
            col = need_column(rows, ("image", "filename", "Image_name"), self.index)
            labels = {Path(r[col]).stem: {k.lower(): v for k, v in r.items()} for r in rows}
        recs = []
        for image in images:
            mask = annotation_for(image, self.src) if has_masks else None
            label = labels.get(image.stem, {})
            raw_plane = label.get("plane") or None
            plane = normalize_plane(raw_plane)
            error = None
            if has_masks and mask is None:
                error = (MASK_MISSING, f"no mask for {image} in {self.src / 'mask'} "
                         f"({image.name} or {image.stem}_Annotation.png)")
            elif raw_plane is not None and plane is None:
                error = (UNKNOWN_LABEL, f"plane {raw_plane!r} of {image} (index {self.index}) is not "
                         "one of abdomen, brain, femur, thorax, cervix, other")
            recs.append(SourceRecord(
                cohort=self.name, source_id=image.stem, image_path=str(image),
                mask_path=str(mask) if mask else None, mask_expected=has_masks,
                patient_id=label.get("patient_id") or None, plane=plane,
                official_split=official_split(label.get("split")), error=error,
            ))
        return recs
