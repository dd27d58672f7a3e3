"""The training mix: named sources, the one seeded (nested) choice, the test-split refusal, lineage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sonosynth.datasets.mix import (Manifests, MixConfig, MixSource, Taken, check_validation_split, choose,
                                    mix_lineage, open_mix, take)
from sonosynth.infra.config import ConfigError, build

KEYS = [f"k{i:03d}" for i in range(120)]


def test_a_smaller_count_takes_a_subset_of_a_larger_one():
    for seed in range(5):
        chosen = {n: choose(KEYS, n, seed, "real") for n in (0, 5, 10, 20, 50, 100, 120)}
        sizes = sorted(chosen)
        for small, big in zip(sizes, sizes[1:]):
            assert set(chosen[small]) <= set(chosen[big]), (seed, small, big)
        assert chosen[120] == sorted(KEYS)


def test_the_choice_is_exact_sorted_seeded_and_independent_of_the_keys_order():
    a = choose(KEYS, 50, 0, "real")
    assert len(a) == len(set(a)) == 50 and a == sorted(a)
    assert choose(list(reversed(KEYS)), 50, 0, "real") == a
    assert choose(KEYS, 50, 1, "real") != a and choose(KEYS, 50, 0, "synthetic") != a  # seed and source matter
    assert choose(KEYS, None, 0) == KEYS
    with pytest.raises(ValueError, match="cannot take 121 of 120"):
        choose(KEYS, 121, 0)


def test_count_fraction_or_all_of_a_source():
    assert MixSource(dataset="d").wanted(30) is None
    assert MixSource(dataset="d", count=7).wanted(30) == 7
    assert MixSource(dataset="d", fraction=0.25).wanted(30) == 8  # rounded
    assert MixSource(dataset="d", fraction=0.01).wanted(30) == 1 and MixSource(dataset="d", fraction=0.5).wanted(0) == 0
    taken = take("real", MixSource(dataset="d", fraction=0.5), KEYS, seed=3)
    assert len(taken.keys) == 60 and taken.available == 120 and set(taken.keys) < set(KEYS)
    assert take("real", MixSource(dataset="d", count=10), KEYS, seed=3).keys == choose(KEYS, 10, 3, "real")
    with pytest.raises(ConfigError, match=r"data.sources.real: d has 120 samples with a mask in split 'train' and "
                                          r"the mix asks for 200 of them; lower its count"):
        take("real", MixSource(dataset="d", count=200), KEYS, seed=3, what="samples with a mask")
    for bad, message in (({"count": 2, "fraction": 0.5}, "count or fraction, not both"),
                         ({"count": -1}, "count must be 0 or more"),
                         ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
                         ({"dataset": " "}, "dataset is empty")):
        with pytest.raises(ConfigError, match=message):
            build(MixConfig, {"sources": {"real": {"dataset": "d", **bad}}})


def test_training_or_choosing_the_checkpoint_on_a_test_split_is_refused_naming_the_source_and_the_fix():
    with pytest.raises(ConfigError, match=r"data.sources.synthetic takes the test split of runs/syn: training on it "
                                          r"would leak it into the scores; set data.sources.synthetic.split=train"):
        build(MixConfig, {"sources": {"real": {"dataset": "runs/a"},
                                      "synthetic": {"dataset": "runs/syn", "split": "test"}}})
    with pytest.raises(ValueError, match="must not be test; use val"):
        check_validation_split("test")
    assert check_validation_split("val") == "val"
    with pytest.raises(ConfigError, match="no training data: pass --dataset"):
        build(MixConfig, {"sources": {"real": {"dataset": "runs/a", "count": 0}}})
    cfg = build(MixConfig, {"sources": {"real": {"dataset": "runs/a"}, "syn": {"dataset": "runs/s", "count": 0}}})
    assert list(cfg.used_sources()) == ["real"]


def test_lineage_records_what_was_taken_from_each_source():
    parts = [Taken("real", "runs/a", "train", 40, ["a1", "a2"]), Taken("synthetic", "runs/s", None, 9, [])]
    record = mix_lineage(parts)
    assert list(record) == ["real", "synthetic"]
    assert record["real"] == {"dataset": "runs/a", "split": "train", "available": 40, "examples": 2,
                              "keys_sha256": hashlib.sha256(b"a1\na2").hexdigest()}
    assert record["synthetic"]["examples"] == 0


def test_a_mix_of_real_datasets_reads_what_it_took(two_datasets, tmp_path):
    a, b = two_datasets
    manifests = Manifests()
    cfg = build(MixConfig, {"seed": 4, "sources": {"a": {"dataset": a, "split": None, "count": 6},
                                                   "b": {"dataset": b, "split": None, "fraction": 0.2}}})
    parts = [take(name, s, [r["key"] for r in manifests.source(name, s)], cfg.seed)
             for name, s in cfg.used_sources().items()]
    assert [len(p.keys) for p in parts] == [6, 6] and [p.available for p in parts] == [40, 30]
    mix = open_mix(parts)
    assert mix.keys() == parts[0].keys + parts[1].keys and [mix[i]["key"] for i in range(len(mix))] == mix.keys()
    assert {mix.meta(i)["split"] for i in range(len(mix))} <= {"train", "val", "test"}
    with pytest.raises(ConfigError, match=r"data.sources.a: .* no samples in split 'nope' \(its splits: .*train \d+"):
        manifests.source("a", MixSource(dataset=a, split="nope"))
    with pytest.raises(ConfigError, match="cannot read the dataset .*sonosynth ingest"):
        Manifests().rows(str(tmp_path / "nothing"))


def test_under_skip_a_mix_reads_past_a_missing_shard_and_counts_it(two_datasets, tmp_path):
    import shutil

    from sonosynth.datasets.tario import CorruptShardError

    root = Path(shutil.copytree(two_datasets[0], tmp_path / "a"))
    keys = [r["key"] for r in Manifests().rows(str(root))]
    parts = [Taken("a", str(root), None, len(keys), sorted(keys))]
    shard = sorted((root / "shards").glob("*.tar"))[0]
    shard.unlink()
    with pytest.raises(CorruptShardError, match=f"lists samples in {shard}, which does not exist"):
        open_mix(parts)
    mix = open_mix(parts, on_error="skip")  # no "not in their datasets" error: the samples are counted
    assert len(mix) == len(keys) - 5 and mix.skipped == {"missing_shard": 1}
    assert build(MixConfig, {"sources": {"a": {"dataset": "d"}}, "reader": {"on_error": "skip"}}).reader.on_error \
        == "skip"
