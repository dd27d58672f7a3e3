"""Small phantom datasets written by the ingest stage, shared by the reader tests."""

from __future__ import annotations

import pytest

from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.infra.config import build


def phantom_dataset(path, num, seed=0, planes=("brain",)) -> str:
    cfg = build(IngestConfig, {"cohort": {"name": "phantom", "phantom": {
        "num": num, "height": 48, "width": 48, "seed": seed, "planes": list(planes)}},
        "out": str(path), "shards": {"max_samples": 5}})
    run_ingest(cfg, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """(40 brain samples, 30 brain + femur samples), 5 per shard."""
    root = tmp_path_factory.mktemp("ds")
    return phantom_dataset(root / "a", 40), phantom_dataset(root / "b", 30, seed=1, planes=("brain", "femur"))
