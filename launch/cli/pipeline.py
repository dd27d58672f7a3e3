"""``sonosynth demo``: the pipeline verb with the demo recipe and a local output folder.

``register(app)`` adds it to the ``sonosynth`` command (``launch/cli/app.py``); the
``pipeline`` verb itself is generated from the stage registry like every stage.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sonosynth.launch.cli.stage_verbs import flag_values, run_stage
from sonosynth.launch.stages import PIPELINE, get_stage


def demo(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="The demo's pipeline recipe.")] = "demo",
    out: Annotated[str, typer.Option(help="Folder for everything the demo writes.")] = "runs/demo",
    progress: Annotated[Optional[bool], typer.Option(
        "--progress/--no-progress", help="Show the stages' progress bars.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override the recipe, e.g. --set lora.engine.max_steps=20 (repeatable).")] = None,
) -> None:
    """The embedded default end to end on this machine: `sonosynth pipeline demo`.

    Phantom and real-sample ingest, a tiny joint-mode LoRA (2 DeepSpeed ranks on a local
    Ray), synthetic image+mask pairs from it, a tiny SAM trained with and without them,
    their evaluation per cohort and the promotion of the new SAM, all tracked in a local
    MLflow store in OUT. OUT/report.html shows the results.

    Example:

    \b
        sonosynth demo --out runs/demo
    """
    stage = get_stage(PIPELINE)
    flags, _ = flag_values(stage, {"out": out, "progress": progress})
    run_stage(stage, recipe, flags, list(set_ or []))


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command()(demo)
