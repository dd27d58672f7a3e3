"""The ``sonosynth`` command.

One verb per registered stage, generated from ``sonosynth.launch.stages`` (``stage_verbs.py``):
each takes the recipe first (a name from configs/ or a YAML path), resolves its config as
defaults < recipe < flags < ``--set a.b=value``, runs the stage and prints its report. The
other verbs are written by hand: ``inspect``, ``config`` and ``tracking-replay`` here,
``demo`` and ``champion`` (``pipeline.py``, ``champion.py``), and the cluster verbs
(``cluster.py``). Exit statuses: ``exits.py``.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from sonosynth.infra.console import set_verbose
from sonosynth.launch.cli.exits import EXIT_CODES, exit_status, failure, set_debug
from sonosynth.launch.cli.stage_verbs import VERBOSE_HELP
from sonosynth.launch.stages import PIPELINE, STAGES

app = typer.Typer(
    name="sonosynth",
    help="Diffusion-based synthetic data augmentation for fetal ultrasound, on Ray clusters.\n\n"
         f"Stages, one verb each: {', '.join(name for name in STAGES if name != PIPELINE)}. "
         f"`sonosynth {PIPELINE}` runs a recipe's stages in order, and `sonosynth demo` runs the embedded "
         "default end to end on this machine. `sonosynth config STAGE` lists every field a recipe or --set can change; "
         "`sonosynth champion` moves a model's champion alias by hand.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", help="On a bug, print the traceback instead of writing it to a log file.")] = False,
             verbose: Annotated[bool, typer.Option("--verbose", help=VERBOSE_HELP)] = False) -> None:
    set_debug(debug)
    if verbose:
        set_verbose(True)


@app.command()
def inspect(
    dataset: Annotated[str, typer.Argument(metavar="DATASET", help="Dataset folder or s3:// prefix.")],
    grid: Annotated[Optional[str], typer.Option(help="Write a PNG grid of samples with masks here.")] = None,
    samples: Annotated[int, typer.Option(help="Samples in the grid.")] = 16,
) -> None:
    """Read a dataset back: manifest counts checked against a full streamed read.

    Prints the counts as JSON and exits 1 when the shards and the manifest disagree.

    Example:

    \b
        sonosynth inspect runs/phantom --grid runs/phantom/grid.png
    """
    from sonosynth.datasets.summary import summarize
    from sonosynth.datasets.tario import CorruptShardError
    from sonosynth.infra.storage import StorageError

    # a dataset that is not there is the caller's to fix (2); a damaged one is a failure (1)
    with exit_status(failed=(CorruptShardError,), usage=(StorageError,)):
        summary = summarize(dataset, grid=grid, grid_samples=samples)
    typer.echo(json.dumps(summary, indent=2))
    if summary["samples_read"] != summary["samples_in_manifest"]:
        failure("shards and manifest disagree")


@app.command("config")
def show_config(
    stage: Annotated[Optional[str], typer.Argument(
        metavar="STAGE", help=f"Stage whose config to explain ({', '.join(STAGES)}).")] = None,
    recipes: Annotated[bool, typer.Option("--recipes", help="List the recipes that ship with sonosynth.")] = False,
) -> None:
    """List every field of a stage's config with its type, default and meaning.

    Without STAGE, list the stages.

    Examples:

    \b
        sonosynth config generate
        sonosynth config --recipes
    """
    from sonosynth.infra.config import describe
    from sonosynth.launch.recipes import recipe_names
    from sonosynth.launch.stages import get_stage

    if recipes:
        typer.echo("\n".join(recipe_names()))
        return
    if stage is None:
        width = max(len(name) for name in STAGES)
        typer.echo("\n".join(f"{s.name:<{width}}  {s.summary}" for s in STAGES.values()))
        return
    with exit_status():
        cls = get_stage(stage).config_class
    typer.echo("\n".join(describe(cls)))


@app.command("tracking-replay")
def tracking_replay(
    folder: Annotated[str, typer.Argument(metavar="FOLDER", help="The job's tracking-offline folder.")],
    uri: Annotated[Optional[str], typer.Option(help="Tracking URI (default: $MLFLOW_TRACKING_URI).")] = None,
    experiment: Annotated[Optional[str], typer.Option(
        help="Send to this experiment instead of the one the records name.")] = None,
) -> None:
    """Send tracking records that a job could not deliver while MLflow was down.

    The run and experiment come from the records: a run created before the server went away
    gets the rest of its records; otherwise the run is created as the job would have created
    it (name, tags, parent run). Registrations the job could not make are made. Delivered
    records leave the folder (it is removed when empty), so a second replay finds nothing.
    A pipeline does this by itself at the start of its next run into the same output.

    Example:

    \b
        sonosynth tracking-replay runs/lora/tracking-offline \\
            --uri http://mlflow:5000
    """
    from sonosynth.infra.tracking import TrackingConfig
    from sonosynth.infra.tracking_replay import replay_folder

    with exit_status(usage=(FileNotFoundError,), failed=(ConnectionError,)):
        done = replay_folder(folder, TrackingConfig(uri=uri), experiment=experiment)
    models = "".join(f"; registered {name} version {v}" for name, v in done.registered.items())
    typer.echo(f"delivered {done.records} records to run {', '.join(done.runs)}{models}")


from sonosynth.launch.cli import champion, cluster, pipeline, stage_verbs  # noqa: E402 - they add verbs to app

stage_verbs.register(app)
pipeline.register(app)
champion.register(app)
cluster.register(app)


def main() -> None:
    from sonosynth.infra.secrets import install_log_redaction
    from sonosynth.infra.storage import default_boto_retries

    from sonosynth.infra.console import configure

    configure()
    install_log_redaction()
    default_boto_retries()
    with exit_status():  # a bug in any verb: one line, and its traceback kept
        app(prog_name="sonosynth")


if __name__ == "__main__":
    sys.exit(main())
