"""``sonosynth demo``: the embedded default (phantom -> tiny LoRA -> synthetic pairs) as stages.

The demo recipe has one section per stage (``ingest``, ``train_lora``, ``generate``); this
module fills in what ties them together (each stage's output is the next one's input, one
local MLflow store) and hands back the stages to run in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sonosynth.infra.config import Config, ConfigError, apply_overrides, build, load_yaml, merge
from sonosynth.launch.recipes import find_recipe
from sonosynth.launch.stages import Stage, get_stage

SECTIONS = ("ingest", "train_lora", "generate")


def plan_demo(recipe: str, root: Path, overrides: list[str]) -> list[tuple[Stage, Config, str]]:
    data: dict[str, Any] = apply_overrides(load_yaml(find_recipe(recipe)), overrides)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"demo recipe {recipe}: unknown sections {unknown}; the sections are {list(SECTIONS)}")
    store = {"uri": f"sqlite:///{root / 'mlflow.db'}"}
    wiring = {
        "ingest": {"out": str(root / "real")},
        "train_lora": {"out": str(root / "lora"), "data": {"dataset": str(root / "real")}, "tracking": store},
        "generate": {"out": str(root / "synthetic"), "sampler": {"lora": str(root / "lora" / "model")},
                     "tracking": store},
    }
    what = {
        "ingest": "phantom cohort -> WebDataset shards",
        "train_lora": "tiny joint-mode LoRA, 2 ranks (the first run builds a DeepSpeed op, ~30 s)",
        "generate": "synthetic image+mask pairs from that LoRA, sampler actors on Ray",
    }
    steps = []
    for section in SECTIONS:
        stage = get_stage(section.replace("_", "-"))
        cfg = build(stage.config_class, merge(data.get(section, {}), wiring[section]), f"demo {section}")
        steps.append((stage, cfg, what[section]))
    return steps
