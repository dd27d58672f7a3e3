"""Read a dataset back: manifest counts, every shard streamed and decoded, a preview grid."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sonosynth.datasets.manifest import read_manifest
from sonosynth.datasets.preview import contact_sheet
from sonosynth.datasets.reader import DatasetReader
from sonosynth.infra.storage import StorageConfig, open_storage


def summarize(uri: str, storage: StorageConfig | None = None, grid: str | None = None,
              grid_samples: int = 16) -> dict[str, Any]:
    """Counts from the manifest, checked against a full streamed read of the shards."""
    store = open_storage(uri, storage)
    table = read_manifest(store).to_pydict()
    reader = DatasetReader(uri, storage=storage)
    read, masks, shown = 0, 0, []
    for sample in reader.samples():
        read += 1
        masks += sample.mask is not None
        if len(shown) < grid_samples:
            shown.append(sample)
    out = {
        "uri": store.uri,
        "samples_in_manifest": len(table["key"]),
        "samples_read": read,
        "with_mask": masks,
        "shards": len(reader.shards),
        "split": dict(Counter(table["split"])),
        "plane": dict(Counter(p or "unlabelled" for p in table["plane"])),
        "cohort": dict(Counter(table["cohort"])),
        "patients": len(set(table["patient_id"])),
    }
    if grid and shown:
        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(shown).save(grid)
        out["grid"] = str(grid)
    return out
