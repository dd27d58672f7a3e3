"""The procedural phantom as a cohort: masks come as outlines, like the real annotations."""

from __future__ import annotations

import numpy as np

from sonosynth.datasets.cohorts.base import Cohort, SourceRecord
from sonosynth.datasets.phantom import PhantomConfig, make_phantom


class PhantomCohort(Cohort):
    name = "phantom"
    has_masks = True

    def __init__(self, config: PhantomConfig):
        self.config = config

    def records(self) -> list[SourceRecord]:
        recs = []
        for i in range(self.config.num):
            plane = self.config.planes[i % len(self.config.planes)]
            recs.append(SourceRecord(
                cohort=self.name, source_id=f"s{self.config.seed:03d}-{i:06d}",
                patient_id=f"ph{self.config.seed:03d}p{i // self.config.images_per_patient:05d}",
                plane=plane, mask_expected=plane != "femur", extra={"phantom_index": i},
            ))
        return recs

    def load(self, rec: SourceRecord) -> tuple[np.ndarray, np.ndarray | None]:
        sample = make_phantom(rec.extra["phantom_index"], self.config)
        return sample.image, sample.outline
