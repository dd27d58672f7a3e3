"""A promoted SAM's LoRA becomes the LoRA's champion, recorded on both; real-only data moves nothing."""

from __future__ import annotations

import logging

from sonosynth.infra.model_registry import Registry
from sonosynth.launch.promote import PromoteRules, promote_candidate, render, trace


def score(dice: dict[str, float]):
    """A scorer whose figures are set in advance: ``dice[version]``."""
    return lambda role, version: {"overall": {"dice_mean": dice[version]}, "by_cohort": {}}


def test_trace_follows_lineage_json_to_the_synthetic_set_and_the_lora_of_its_run(lineage_world):
    w = lineage_world
    lora, folder = w.lora_version("a")
    synthetic = w.synthetic("synthetic", folder)
    drawn_by_controlnet = w.dataset("masks", "generate", "sampler:\n  lora: null\n  controlnet: /cn/model\n")
    sam = w.sam_version(synthetic, drawn_by_controlnet)

    lineage = trace(Registry(w.uri), w.sam, sam)
    assert lineage.error is None and lineage.base_model == "tiny-sam-seed0"
    assert set(lineage.sources) == {"real", "synthetic0", "synthetic1"}
    assert lineage.loras == [(w.lora, lora)]  # found by the run id in summary.json beside the LoRA folder
    by_set = {s.dataset: s for s in lineage.synthetic}
    assert by_set[str(synthetic)].note.startswith("registered from run")
    assert by_set[str(drawn_by_controlnet)].lora is None and "ControlNet (/cn/model)" in by_set[
        str(drawn_by_controlnet)].note
    assert lineage.tags()["sonosynth.lineage.lora"] == f"{w.lora}/{lora}"

    assert trace(Registry(w.uri), w.sam, "99").error.startswith(f"cannot read lineage.json of {w.sam} version 99")


def test_a_models_uri_names_the_lora_version_and_a_folder_without_summary_is_said(lineage_world):
    w = lineage_world
    lora, _ = w.lora_version("a")
    by_uri = w.synthetic("by-uri", f"models:/{w.lora}/{lora}")
    lost = w.synthetic("lost", w.root / "somewhere" / "model")
    lineage = trace(Registry(w.uri), w.sam, w.sam_version(by_uri, lost))
    assert lineage.loras == [(w.lora, lora)]
    note = {s.dataset: s.note for s in lineage.synthetic}[str(lost)]
    assert note.startswith("no summary.json beside") and "unknown" in lineage.tags()["sonosynth.lineage.lora"]


def test_the_first_promotion_crowns_the_lora_too_and_is_logged_at_info(lineage_world, caplog):
    w = lineage_world
    lora, folder = w.lora_version("a")
    synthetic = w.synthetic("synthetic", folder)
    sam = w.sam_version(synthetic)

    with caplog.at_level(logging.INFO):
        d = promote_candidate(Registry(w.uri), w.sam, sam, score({sam: 0.5}), PromoteRules())
    assert d.decision == "first" and w.champion(w.sam) == sam and w.champion(w.lora) == lora
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "no champion to compare with" in caplog.text
    lora_tags = w.tags(w.lora, lora)
    assert lora_tags["sonosynth.promoted_with"] == f"{w.sam}/{sam}" and lora_tags["sonosynth.decision"] == "lineage"
    assert lora_tags["sonosynth.synthetic"] == str(synthetic)
    sam_tags = w.tags(w.sam, sam)
    assert sam_tags["sonosynth.lineage.lora"] == f"{w.lora}/{lora}"
    assert sam_tags["sonosynth.lineage.synthetic"] == str(synthetic)
    assert sam_tags["sonosynth.lineage.decision"] == f"{w.lora} champion is now version {lora} (was none)"
    assert d.lineage["lora"]["champion_after"] == lora and "lineage: " in render(d)


def test_a_refused_or_real_only_champion_leaves_the_lora_champion(lineage_world):
    w = lineage_world
    registry = Registry(w.uri)
    lora1, folder1 = w.lora_version("a")
    lora2, folder2 = w.lora_version("b")
    first = w.sam_version(w.synthetic("s1", folder1))
    refused = w.sam_version(w.synthetic("s2", folder2))
    real_only = w.sam_version()
    dice = score({first: 0.5, refused: 0.4, real_only: 0.6})
    promote_candidate(registry, w.sam, first, dice, PromoteRules())

    d = promote_candidate(registry, w.sam, refused, dice, PromoteRules())
    assert d.decision == "refused" and not d.lineage and w.champion(w.lora) == lora1
    assert "sonosynth.lineage.lora" not in w.tags(w.sam, refused)

    d = promote_candidate(registry, w.sam, real_only, dice, PromoteRules())
    assert d.decision == "promoted" and w.champion(w.sam) == real_only and w.champion(w.lora) == lora1
    tags = w.tags(w.sam, real_only)
    assert tags["sonosynth.lineage.lora"] == "none" and tags["sonosynth.lineage.synthetic"] == "none"
    assert tags["sonosynth.lineage.decision"].startswith("trained on real data only: no LoRA")
    assert "sonosynth.promoted_with" not in w.tags(w.lora, lora2)


def test_sets_drawn_by_two_loras_move_nothing_and_lineage_false_skips_it(lineage_world):
    w = lineage_world
    registry = Registry(w.uri)
    lora1, folder1 = w.lora_version("a")
    _, folder2 = w.lora_version("b")
    both = w.sam_version(w.synthetic("s1", folder1), w.synthetic("s2", folder2))
    d = promote_candidate(registry, w.sam, both, score({both: 0.5}), PromoteRules())
    assert w.champion(w.lora) is None and "drawn by several LoRAs" in d.lineage["text"]

    later = w.sam_version(w.synthetic("s3", folder1))
    d = promote_candidate(registry, w.sam, later, score({both: 0.5, later: 0.9}), PromoteRules(), lineage=False)
    assert d.decision == "promoted" and not d.lineage and w.champion(w.lora) is None
