"""``sonosynth champion show`` prints the champion's lineage; ``rollback`` says what became of the LoRA."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sonosynth.infra.model_registry import AliasChange, Registry
from sonosynth.launch.promote import crown_lineage, rollback_lineage


def cli(uri: str, *args: str):
    from sonosynth.launch.cli.app import app

    return CliRunner().invoke(app, ["champion", *args, "--uri", uri])


def crown(w, version: str) -> None:
    """Make a SAM version champion by hand and let its lineage follow, as a promotion does."""
    registry = Registry(w.uri)
    crown_lineage(registry, registry.set_champion(w.sam, version))


def test_show_prints_the_lineage_of_the_sam_and_of_the_lora_champion(lineage_world):
    w = lineage_world
    lora, folder = w.lora_version("a")
    synthetic = w.synthetic("synthetic", folder)
    sam = w.sam_version(synthetic)
    crown(w, sam)

    res = cli(w.uri, "show", w.sam)
    assert res.exit_code == 0, res.output
    assert f"lineage of version {sam}:" in res.stdout
    assert f"synthetic set:      {synthetic}" in res.stdout and "base model:         tiny-sam-seed0" in res.stdout
    assert f"LoRA:               {w.lora} version {lora} (champion)" in res.stdout

    res = cli(w.uri, "show", w.lora)
    assert res.exit_code == 0, res.output
    assert f"made champion with: {w.sam} version {sam} (champion)" in res.stdout
    assert f"version {lora}    lineage" in res.stdout  # its history row
    info = json.loads(cli(w.uri, "show", w.lora, "--json").stdout)
    assert info["lineage"]["promoted_with"] == f"{w.sam}/{sam}"


def test_rolling_the_sam_back_rolls_back_the_lora_its_promotion_moved(lineage_world):
    w = lineage_world
    lora1, folder1 = w.lora_version("a")
    lora2, folder2 = w.lora_version("b")
    sam1, sam2 = w.sam_version(w.synthetic("s1", folder1)), w.sam_version(w.synthetic("s2", folder2))
    crown(w, sam1)
    crown(w, sam2)
    assert w.champion(w.lora) == lora2

    res = cli(w.uri, "rollback", w.sam)
    assert res.exit_code == 0, res.output
    assert f"{w.lora}: champion rolled back from version {lora2} to version {lora1}, with {w.sam}" in res.stdout
    assert w.champion(w.sam) == sam1 and w.champion(w.lora) == lora1
    assert w.tags(w.lora, lora2)["sonosynth.rolled_back_with"] == f"{w.sam}/{sam2}"


def test_a_rollback_leaves_a_lora_champion_its_promotion_did_not_make(lineage_world):
    w = lineage_world
    registry = Registry(w.uri)
    lora, folder = w.lora_version("a")
    sam, real_only = w.sam_version(w.synthetic("s1", folder)), w.sam_version()
    registry.tag_version(w.sam, real_only, {"sonosynth.lineage.lora": "none"})
    registry.tag_version(w.sam, sam, {"sonosynth.lineage.lora": f"{w.lora}/{lora}"})
    registry.set_champion(w.lora, lora)  # by hand: no promotion made it champion

    said = rollback_lineage(registry, AliasChange(w.sam, sam, "rolled_back", "", real_only, sam))
    assert said == f"{w.sam} version {real_only} was trained without a LoRA: no LoRA champion changes"
    said = rollback_lineage(registry, AliasChange(w.sam, real_only, "rolled_back", "", sam, real_only))
    assert said == (f"{w.lora}: champion stays version {lora} (the promotion of {w.sam} version {sam} "
                    "did not make it champion)")
    assert w.champion(w.lora) == lora
