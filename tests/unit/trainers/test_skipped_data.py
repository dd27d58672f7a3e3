"""A damaged training dataset under the recipe's ``data.reader.on_error``: ``raise`` stops the task
with an error naming the shard; ``skip`` trains on the other samples and reports what it left out
where the job's metrics come from (``TrainTask.data_skipped``, combined over ranks by the engine)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.tario import CorruptShardError, tar_members
from sonosynth.infra.config import build
from sonosynth.infra.storage import open_storage
from sonosynth.trainers.classifier.train import ClassifierTask, ClassifierTrainConfig
from sonosynth.trainers.engine import job_skipped
from sonosynth.trainers.task import WorkerContext

PLANES = ["abdomen", "brain", "femur", "thorax"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """40 phantom samples of 4 planes, 5 per shard, 20% of them in val."""
    out = tmp_path_factory.mktemp("skipped") / "ds"
    run_ingest(build(IngestConfig, {
        "out": str(out), "splits": {"val": 0.2, "test": 0.0}, "shards": {"max_samples": 5},
        "cohort": {"name": "phantom", "phantom": {"num": 40, "height": 32, "width": 32, "planes": PLANES}}}),
        progress=False)
    return out


@pytest.fixture
def damaged(pristine, tmp_path) -> tuple[Path, dict[str, dict]]:
    """A copy to damage, and its manifest rows by key."""
    root = Path(shutil.copytree(pristine, tmp_path / "ds"))
    rows = {r["key"]: r for r in pq.read_table(root / "manifest.parquet").to_pylist()}
    return root, rows


def classifier(root: Path, out: Path, on_error: str) -> ClassifierTask:
    cfg = build(ClassifierTrainConfig, {
        "out": str(out), "data": {"sources": {"real": {"dataset": str(root)}}, "stats_images": 0,
                                  "reader": {"on_error": on_error}},
        "model": {"backbone": "tiny_resnet", "image_size": 32}, "engine": {"max_steps": 1, "micro_batch": 2}})
    return ClassifierTask(cfg, WorkerContext(0, 1, 0, torch.device("cpu"), open_storage(str(out))))


def test_a_corrupt_png_is_named_under_raise_and_skipped_and_counted_under_skip(damaged, tmp_path):
    root, rows = damaged
    key = sorted(k for k, r in rows.items() if r["split"] == "train")[3]
    shard = root / rows[key]["shard"]
    with open(shard, "rb") as fh:
        name, offset, size = next(m[:3] for m in tar_members(fh, data=False) if m[0] == f"{key}.image.png")
    data = bytearray(shard.read_bytes())
    data[offset:offset + size] = b"\x89PNG-not-really" + bytes(size - 15)
    shard.write_bytes(bytes(data))

    strict = classifier(root, tmp_path / "raise", "raise")  # indexing reads tar headers only
    with pytest.raises(CorruptShardError, match=rf"{re.escape(str(shard))}: member {re.escape(name)} at byte "
                                                rf"{offset} does not decode"):
        [strict.train_dataset()[i] for i in range(len(strict.train_dataset()))]

    task = classifier(root, tmp_path / "skip", "skip")
    items = task.train_dataset()
    opened = task.data_skipped()
    assert opened == {} and len(items) == sum(r["split"] == "train" for r in rows.values())
    items.transform = task.eval_transform  # no augmentation draws: equal images give equal pixels
    got = [items[i] for i in range(len(items))]
    keys = items.mix.keys()
    i = keys.index(key)
    substitute = keys[(i + 1) % len(keys)]  # the next readable sample of its dataset, with its own label
    assert torch.equal(got[i]["pixel_values"], got[(i + 1) % len(keys)]["pixel_values"])
    assert got[i]["label"] == PLANES.index(rows[substitute]["plane"])
    assert all(got[j]["label"] == PLANES.index(rows[k]["plane"]) for j, k in enumerate(keys) if k != key)
    assert task.data_skipped() == {"corrupt_sample": 1}
    assert job_skipped(task.ctx, opened, task.data_skipped()) == {"corrupt_sample": 1}


def test_a_missing_shard_is_named_under_raise_and_its_samples_left_out_and_counted_under_skip(damaged, tmp_path):
    root, rows = damaged
    shard = root / rows[sorted(k for k, r in rows.items() if r["split"] == "train")[0]]["shard"]
    gone = {k for k, r in rows.items() if root / r["shard"] == shard}
    shard.unlink()
    with pytest.raises(CorruptShardError, match=rf"lists samples in {re.escape(str(shard))}, which does not exist"):
        classifier(root, tmp_path / "raise", "raise")

    task = classifier(root, tmp_path / "skip", "skip")
    train, val = task.train_dataset(), task.eval_dataset()
    keys = train.mix.keys() + val.mix.keys()
    assert sorted(keys) == sorted(set(rows) - gone)
    for items in (train, val):  # labels follow the samples that are read
        assert [items[i]["label"] for i in range(len(items))] == [PLANES.index(rows[k]["plane"])
                                                                  for k in items.mix.keys()]
    assert task.train_labels == train.labels
    skipped = task.data_skipped()
    assert skipped == {"missing_shard": 1 + any(rows[k]["split"] == "val" for k in gone)}  # train and val mixes


def test_ranks_are_combined_what_opening_skipped_once_what_reading_skipped_added_up():
    class TwoRanks(WorkerContext):
        def all_gather(self, obj):
            return [({"missing_shard": 1}, {"corrupt_sample": 2}), obj]

    ctx = TwoRanks(1, 2, 0, torch.device("cpu"), None)
    opened = {"missing_shard": 1}
    assert job_skipped(ctx, opened, {"missing_shard": 1, "corrupt_sample": 3}) == {"corrupt_sample": 5,
                                                                                  "missing_shard": 1}
    assert job_skipped(WorkerContext(0, 1, 0, torch.device("cpu"), None), {}, {}) == {}


def test_each_training_stage_takes_the_policy_and_a_resumed_job_may_change_it():
    from sonosynth.trainers.config import job_fingerprint
    from sonosynth.trainers.diffusion.train import LoraTrainConfig
    from sonosynth.trainers.sam.train import SamTrainConfig

    mix = {"sources": {"real": {"dataset": "runs/d"}}}
    for cls, data in ((ClassifierTrainConfig, mix), (SamTrainConfig, mix), (LoraTrainConfig, {"dataset": "runs/d"})):
        strict = build(cls, {"out": "runs/o", "data": data})
        skipping = build(cls, {"out": "runs/o", "data": {**data, "reader": {"on_error": "skip"}}})
        assert (strict.data.reader.on_error, skipping.data.reader.on_error) == ("raise", "skip")
        assert job_fingerprint(strict) == job_fingerprint(skipping), cls.__name__
