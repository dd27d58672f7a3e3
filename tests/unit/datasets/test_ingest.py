from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sonosynth.datasets.geometry import Ellipse
from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.reader import DatasetReader
from sonosynth.infra.config import ConfigError, build


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _outline(shape=(80, 100)):
    e = Ellipse(50, 40, 30, 22, 0.4)
    return (e.inside(shape, 1.5) & ~e.inside(shape, -1.5)).astype(np.uint8) * 255


def _image(shape=(80, 100), seed=0):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """One good input and one of every kind of bad one."""
    src = tmp_path / "src"
    img, msk = src / "image", src / "mask"
    _png(img / "good.png", _image())
    _png(msk / "good_Annotation.png", _outline())
    _png(img / "labelled.png", _image(seed=1))
    _png(msk / "labelled.png", _outline())
    good_bytes = (img / "good.png").read_bytes()
    (img / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    _png(msk / "truncated_Annotation.png", _outline())
    (img / "garbage.png").write_bytes(b"not a png at all")
    _png(msk / "garbage_Annotation.png", _outline())
    _png(img / "nomask.png", _image())
    _png(img / "badsize.png", _image())
    _png(msk / "badsize_Annotation.png", _outline((60, 60)))
    _png(img / "empty.png", _image())
    _png(msk / "empty_Annotation.png", np.zeros((80, 100), np.uint8))
    line = np.zeros((80, 100), np.uint8)
    line[40:42, 5:95] = 255
    _png(img / "line.png", _image())
    _png(msk / "line_Annotation.png", line)
    _png(img / "badmask.png", _image())
    (msk / "badmask_Annotation.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _png(img / "dup.png", _image())
    _png(msk / "dup_Annotation.png", _outline())
    Image.fromarray(_image()).save(img / "dup.jpg")
    _png(img / "kidney.png", _image())
    _png(msk / "kidney_Annotation.png", _outline())
    (src / "labels.csv").write_text("image,plane,patient_id\nlabelled.png, Fetal brain ,P1\nkidney.png,kidney,P2\n")
    return src


def _cfg(src, out, **extra) -> IngestConfig:
    return build(IngestConfig, {"cohort": {"name": "folder", "src": str(src), "index": str(src / "labels.csv")},
                                "out": str(out), **extra})


def test_every_quarantine_reason_and_the_rest_ingested(messy_folder, tmp_path):
    out = tmp_path / "ds"
    report = run_ingest(_cfg(messy_folder, out), progress=False)
    lines = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    reasons = {q["source_id"]: q["reason"] for q in lines}
    assert reasons == {
        "truncated": "unreadable_image", "garbage": "unreadable_image", "nomask": "mask_missing",
        "badsize": "mask_size_mismatch", "empty": "empty_mask", "line": "mask_not_ellipse",
        "badmask": "unreadable_mask", "dup": "duplicate_key", "kidney": "unknown_label",
    }
    assert all(q["detail"] and ("src" in q["detail"] or "mask" in q["detail"] or "plane" in q["detail"])
               for q in lines)
    assert report.ingested == 3 and sum(report.quarantined.values()) == 9  # good, labelled, first dup
    table = pq.read_table(out / "manifest.parquet").to_pydict()
    assert sorted(table["key"]) == ["folder-dup", "folder-good", "folder-labelled"]
    row = dict(zip(table, (table[c][table["key"].index("folder-labelled")] for c in table)))
    assert row["plane"] == "brain" and row["patient_id"] == "P1" and row["has_mask"]
    assert row["qc_outline_coverage"] > 0.95 and row["width"] == 100 and row["height"] == 80


def test_fpdb_rows_without_images_are_quarantined(shared_data, tmp_path):
    src = shared_data / "fpdb_planes_sample"
    report = run_ingest(build(IngestConfig, {
        "cohort": {"name": "fpdb", "src": str(src), "index": str(src / "lora_train_data.csv")},
        "out": str(tmp_path / "ds")}), progress=False)
    assert report.ingested == 100 and report.quarantined == Counter(image_missing=20)


def test_real_head_cohort_masks_are_filled(shared_data, tmp_path):
    out = tmp_path / "hc18"
    report = run_ingest(build(IngestConfig, {"cohort": {"name": "hc18", "src": str(shared_data / "hc18_sample")},
                                             "out": str(out), "shards": {"max_samples": 16}}), progress=False)
    assert report.ingested == 40 and report.shards == 3 and not report.quarantined
    for item in DatasetReader(str(out), split="train"):
        mask, meta = item["mask"][0].numpy(), item["meta"]
        assert set(np.unique(mask)) <= {0, 255} and item["image"].shape[1:] == (540, 800)
        h, w = mask.shape
        assert mask[int(meta["qc_ellipse_cy"]), int(meta["qc_ellipse_cx"])] == 255  # filled, not an outline
        assert 0.02 < meta["qc_area_frac"] < 0.6 and meta["qc_outline_coverage"] > 0.95


def test_rerun_is_safe_and_resumes_only_missing_shards(tmp_path):
    out = tmp_path / "ds"
    cfg = build(IngestConfig, {"cohort": {"name": "phantom", "phantom": {"num": 30, "height": 64, "width": 64}},
                               "out": str(out), "shards": {"max_samples": 8}})
    first = run_ingest(cfg, progress=False)
    manifest = (out / "manifest.parquet").read_bytes()
    shard_bytes = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    # a crash after two shards: one shard and one completion record lost
    (out / "shards" / "phantom-000001.tar").unlink()
    (out / "_done" / "phantom-000002.json").unlink()
    again = run_ingest(cfg, progress=False)
    assert first.ingested == again.ingested == 30 and again.reused_shards == 2
    assert (out / "manifest.parquet").read_bytes() == manifest
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == shard_bytes  # byte-identical
    keys = [s["key"] for s in DatasetReader(str(out))]
    assert len(keys) == len(set(keys)) == 30


def test_fewer_inputs_remove_stale_shards(tmp_path):
    out = tmp_path / "ds"
    base = {"cohort": {"name": "phantom", "phantom": {"num": 30, "height": 64, "width": 64}},
            "out": str(out), "shards": {"max_samples": 8}}
    run_ingest(build(IngestConfig, base), progress=False)
    base["cohort"]["phantom"]["num"] = 10
    run_ingest(build(IngestConfig, base), progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["phantom-000000.tar", "phantom-000001.tar"]
    assert len(list(DatasetReader(str(out)))) == 10


def test_another_cohort_into_the_same_destination_is_refused(messy_folder, tmp_path):
    out = tmp_path / "ds"
    run_ingest(build(IngestConfig, {"cohort": {"name": "phantom", "phantom": {"num": 4}}, "out": str(out)}),
               progress=False)
    before = sorted(p.name for p in (out / "shards").iterdir())
    with pytest.raises(ConfigError, match=r"holds a different ingest job \(cohort.name: 'phantom' there"):
        run_ingest(_cfg(messy_folder, out), progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == before


def test_parallel_workers_give_the_same_dataset(tmp_path):
    spec = {"cohort": {"name": "phantom", "phantom": {"num": 24, "height": 64, "width": 64}},
            "shards": {"max_samples": 6}}
    run_ingest(build(IngestConfig, {**spec, "out": str(tmp_path / "a")}), progress=False)
    run_ingest(build(IngestConfig, {**spec, "out": str(tmp_path / "b"), "workers": 2}), progress=False)
    for name in ("phantom-000000.tar", "phantom-000003.tar"):
        assert (tmp_path / "a/shards" / name).read_bytes() == (tmp_path / "b/shards" / name).read_bytes()
