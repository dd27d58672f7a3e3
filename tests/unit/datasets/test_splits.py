from __future__ import annotations

from sonosynth.datasets.cohorts.base import SourceRecord
from sonosynth.datasets.splits import SplitConfig, assign_splits


def _recs(n_patients, per_patient=3, start=0):
    return [SourceRecord("c", f"p{p}_{i}", patient_id=f"p{p}")
            for p in range(start, start + n_patients) for i in range(per_patient)]


def test_patient_disjoint_and_roughly_proportional():
    recs = _recs(400)
    splits, report = assign_splits(recs, SplitConfig(val=0.2, test=0.1, seed=3))
    by_patient = {}
    for r in recs:
        by_patient.setdefault(r.patient_id, set()).add(splits[r.key])
    assert all(len(s) == 1 for s in by_patient.values())
    assert report["leaking_patients"] == 0
    assert 0.05 < report["counts"]["test"] / len(recs) < 0.15
    assert 0.14 < report["counts"]["val"] / len(recs) < 0.26


def test_adding_patients_does_not_move_existing_ones():
    cfg = SplitConfig(seed=11)
    before, _ = assign_splits(_recs(50), cfg)
    after, _ = assign_splits(_recs(50) + _recs(70, start=50), cfg)
    assert all(after[k] == v for k, v in before.items())
    other_seed, _ = assign_splits(_recs(50), SplitConfig(seed=12))
    assert other_seed != before


def test_split_file_leak_is_reported(tmp_path):
    recs = _recs(3, per_patient=2)
    f = tmp_path / "splits.csv"
    f.write_text("source_id;split\np0_0;train\np0_1;test\np1_0;train\np1_1;train\n")
    splits, report = assign_splits(recs, SplitConfig(source="file", file=str(f)))
    assert splits["c-p0_1"] == "test"
    assert report["leaking_patients"] == 1
    assert report["leaks"][0] == {"patient_id": "p0", "splits": {"train": ["c-p0_0"], "test": ["c-p0_1"]}}
    assert report["not_in_file"] == 2


def test_cohort_source_keeps_official_test_and_splits_train_side():
    recs = [SourceRecord("c", f"s{i}", patient_id=f"p{i}", official_split="test" if i < 10 else "train")
            for i in range(200)]
    splits, report = assign_splits(recs, SplitConfig(source="cohort", val=0.25))
    assert all(splits[f"c-s{i}"] == "test" for i in range(10))
    assert report["counts"]["test"] == 10 and report["counts"]["val"] > 20
