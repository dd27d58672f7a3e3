"""``sonosynth demo``: the embedded default, which is ``sonosynth pipeline demo``.

``configs/demo.yaml`` is a pipeline recipe (phantom and real-sample ingest -> tiny LoRA ->
synthetic pairs -> tiny SAM with and without them -> evaluate -> promote, all local);
``sonosynth.launch.pipeline`` runs it. ``plan_demo`` is kept for callers of the earlier
demo: it hands back the pipeline as the one stage to run.
"""

from __future__ import annotations

from pathlib import Path

from sonosynth.infra.config import Config
from sonosynth.infra.stage import Report
from sonosynth.launch.pipeline import PipelineConfig, resolve_pipeline
from sonosynth.launch.stages import Stage


def demo_config(recipe: str = "demo", out: str | Path = "runs/demo", overrides: list[str] | None = None,
                **flags) -> PipelineConfig:
    """The demo pipeline's config: the recipe, ``--out``, then ``--set SECTION.key=value``."""
    return resolve_pipeline(recipe, {"out": str(out), **flags}, overrides or [])


def run_demo(recipe: str = "demo", out: str | Path = "runs/demo", overrides: list[str] | None = None) -> Report:
    from sonosynth.launch.pipeline import run

    return run(demo_config(recipe, out, overrides))


def _pipeline_stage() -> Stage:
    def load():
        from sonosynth.launch.pipeline import PipelineConfig, run

        return PipelineConfig, run

    return Stage("pipeline", "the stages of a pipeline recipe in order, each skipped when done", load)


def plan_demo(recipe: str, root: Path, overrides: list[str]) -> list[tuple[Stage, Config, str]]:
    """[(the pipeline stage, the demo's PipelineConfig, what it does)]."""
    cfg = demo_config(recipe, Path(root), overrides)
    return [(_pipeline_stage(), cfg, f"the {cfg.name} pipeline: {' -> '.join(cfg.stages)}")]
