from __future__ import annotations

import pytest

from sonosynth.datasets.ingest import IngestConfig
from sonosynth.infra.config import ConfigError, apply_overrides, build, describe
from sonosynth.launch.recipes import resolve


def test_unknown_key_names_the_closest_known_key():
    with pytest.raises(ConfigError) as err:
        build(IngestConfig, {"shards": {"max_sample": 3}}, "recipe.yaml")
    assert "shards.max_sample" in str(err.value) and "max_samples" in str(err.value)
    assert "recipe.yaml" in str(err.value)


def test_bad_value_names_the_key_and_the_fix():
    with pytest.raises(ConfigError) as err:
        build(IngestConfig, {"shards": {"max_samples": 0}})
    assert "shards.max_samples" in str(err.value) and "at least 1" in str(err.value)
    with pytest.raises(ConfigError, match="pass --src"):
        build(IngestConfig, {"cohort": {"name": "hc18"}})


def test_overrides_parse_yaml_values_and_create_sections():
    tree = apply_overrides({}, ["a.b=1", "a.c=0.5", "d=true", "e=[x, y]", "f=null", "g=text"])
    assert tree == {"a": {"b": 1, "c": 0.5}, "d": True, "e": ["x", "y"], "f": None, "g": "text"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])


def test_precedence_defaults_recipe_flags_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("out: from-recipe\nworkers: 3\nshards: {max_samples: 7}\n")
    cfg = resolve(IngestConfig, str(recipe), {"out": "from-flag", "workers": None},
                  ["shards.max_samples=9"])
    assert (cfg.out, cfg.workers, cfg.shards.max_samples) == ("from-flag", 3, 9)


def test_config_round_trips_and_flattens():
    cfg = build(IngestConfig, {"cohort": {"name": "phantom", "phantom": {"num": 5}}})
    again = build(IngestConfig, __import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.flat()["cohort.phantom.num"] == 5


def test_every_field_is_documented():
    lines = describe(IngestConfig)
    undocumented = [line for line in lines if line.rstrip().endswith(":")]
    assert lines and not undocumented, undocumented
