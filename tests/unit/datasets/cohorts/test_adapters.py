"""Each cohort adapter on the real samples in ../shared/data, and on crafted layouts."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from sonosynth.datasets.cohorts import CohortConfig, CohortError, make_cohort


def _records(**cfg):
    return make_cohort(CohortConfig(**cfg)).records()


def test_hc18_sample(shared_data):
    recs = _records(name="hc18", src=str(shared_data / "hc18_sample"))
    assert len(recs) == 40 and all(r.error is None and r.mask_path for r in recs)
    assert {r.plane for r in recs} == {"brain"}
    r = next(r for r in recs if r.source_id == "110_HC")
    assert r.key == "hc18-110_HC" and r.patient_id == "hc18-110" and r.mask_path.endswith("110_HC_Annotation.png")


def test_hc18_official_layout_with_pixel_size_csv(shared_data, tmp_path):
    src = tmp_path / "training_set"
    src.mkdir()
    for stem, target in (("1_HC", "001_HC"), ("14_HC", "001_2HC")):
        shutil.copy(shared_data / "hc18_sample/image" / f"{stem}.png", src / f"{target}.png")
        shutil.copy(shared_data / "hc18_sample/mask" / f"{stem}_Annotation.png", src / f"{target}_Annotation.png")
    (tmp_path / "training_set_pixel_size_and_HC.csv").write_text(
        "filename,pixel size(mm),head circumference (mm)\n001_HC.png,0.069,44.3\n001_2HC.png,0.089,56.8\n")
    recs = _records(name="hc18", src=str(tmp_path))
    assert [r.source_id for r in recs] == ["001_2HC", "001_HC"]
    assert {r.patient_id for r in recs} == {"hc18-001"}  # two scans, one fetus
    assert recs[1].pixel_size_mm == pytest.approx(0.069) and recs[1].extra["hc_mm"] == pytest.approx(44.3)


def test_fpdb_head_sample_without_index(shared_data):
    recs = _records(name="fpdb", src=str(shared_data / "es_head_sample"))
    assert len(recs) == 24 and all(r.mask_path and r.plane == "brain" for r in recs)
    assert recs[0].patient_id.startswith("fpdb-") and recs[0].source_id.startswith("Patient")


def test_fpdb_planes_with_category_csv(shared_data):
    recs = _records(name="fpdb", src=str(shared_data / "fpdb_planes_sample"),
                    index=str(shared_data / "fpdb_planes_sample/lora_train_data.csv"))
    ok = [r for r in recs if r.error is None]
    assert Counter(r.plane for r in ok) == {p: 20 for p in ("abdomen", "brain", "femur", "thorax", "other")}
    assert Counter(r.error[0] for r in recs if r.error) == {"image_missing": 20}  # cervix rows


def test_fpdb_official_index_semicolon_bom_and_padded_header(shared_data, tmp_path):
    original = (shared_data / "fpdb_planes_sample/FETAL_PLANES_DB_train_subset_index.csv").read_bytes()
    assert original.startswith(b"\xef\xbb\xbf")
    text = original.decode("utf-8-sig").replace(",", ";")
    index = tmp_path / "FETAL_PLANES_DB_data.csv"
    index.write_bytes(b"\xef\xbb\xbf" + text.encode())
    recs = _records(name="fpdb", src=str(shared_data / "fpdb_planes_sample"), index=str(index))
    ok = [r for r in recs if r.error is None]
    assert len(recs) == 6148 and len(ok) == 100
    assert {r.official_split for r in ok} == {"train"}  # the `Train ` column, padded header
    assert all(r.patient_id == f"fpdb-{int(r.source_id[7:12]):05d}" for r in ok)
    assert {"Operator", "US_Machine"} <= set(ok[0].extra)


def test_african_planes_with_csv(shared_data):
    recs = _records(name="africa", src=str(shared_data / "africa_planes_train"))
    assert len(recs) >= 216 and all(r.error is None for r in recs)
    assert set(Counter(r.plane for r in recs)) == {"abdomen", "brain", "femur", "thorax"}
    r = next(r for r in recs if r.source_id == "patient002_EGY_plane0")
    assert r.patient_id == "africa-EGY-002" and r.extra["country"] == "EGY" and r.plane == "abdomen"
    # patient numbers restart per centre: same number, different patients
    assert r.patient_id != next(x for x in recs if x.source_id == "patient002_MWI_plane0").patient_id


def test_african_planes_names_only(shared_data, tmp_path):
    for name in ("patient018_UGA_plane1.png", "patient002_EGY_plane3.png"):
        shutil.copy(shared_data / "africa_planes_train" / name, tmp_path / name)
    recs = _records(name="africa", src=str(tmp_path))
    assert [(r.plane, r.patient_id) for r in recs] == [("thorax", "africa-EGY-002"), ("brain", "africa-UGA-018")]


def test_folder_layout(shared_data):
    recs = _records(name="folder", src=str(shared_data / "es_head_sample"))
    assert len(recs) == 24 and all(r.mask_path for r in recs) and recs[0].cohort == "folder"


def test_wrong_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CohortError, match="NNN_HC.png"):
        _records(name="hc18", src=str(tmp_path))
    with pytest.raises(CohortError, match="does not exist"):
        _records(name="africa", src=str(tmp_path / "nope"))
