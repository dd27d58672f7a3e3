"""The operators' verbs: ``sonosynth pipeline``, ``promote`` and ``rollback``.

``register(app)`` adds them to the ``sonosynth`` command (``launch/cli/app.py``).
"""

from __future__ import annotations

from typing import Annotated, NoReturn, Optional

import typer

from sonosynth.infra.config import ConfigError
from sonosynth.infra.stage import StageFailed
from sonosynth.infra.storage import StorageError

USAGE_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def _exit(err: BaseException | str, code: int) -> NoReturn:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code)


def _client(uri: str | None):
    from mlflow import MlflowClient

    from sonosynth.infra.tracking import TrackingConfig

    return MlflowClient(TrackingConfig(uri=uri).resolved_uri())


def pipeline(
    recipe: Annotated[str, typer.Argument(
        metavar="RECIPE", help="Pipeline recipe: a name in configs/ (e.g. demo) or a YAML path.")],
    out: Annotated[Optional[str], typer.Option(
        help="Output folder or s3://bucket/prefix of every stage, the report and the lineage.")] = None,
    from_stage: Annotated[Optional[str], typer.Option(
        "--from", metavar="SECTION", help="Re-run this section and every later one (the earlier ones must "
                                          "have finished).")] = None,
    only: Annotated[Optional[str], typer.Option(
        metavar="SECTION", help="Re-run this section alone (what it reads must have finished).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        help="MLflow server or store of every stage (default: $MLFLOW_TRACKING_URI, else OUT/mlflow.db).")] = None,
    progress: Annotated[Optional[bool], typer.Option(
        "--progress/--no-progress", help="Show the stages' progress bars.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override any field: SECTION.key=value for a stage (e.g. lora.engine.max_steps=20), or a "
             "pipeline field (repeatable).")] = None,
) -> None:
    """Run the stages of a pipeline recipe in order, skipping those already done.

    Each section of the recipe is one stage (ingest, train-lora, generate, train-sam,
    train-classifier, evaluate, promote) writing to OUT/SECTION/KEY, where the key hashes
    the stage's config and its inputs' keys. A section whose output is finished is
    skipped, so a killed or failed pipeline resumes where it stopped, and changing one
    section re-runs it and what depends on it. One MLflow run holds a nested run per
    stage. OUT gets report.html (synthetic pairs, Dice before/after synthetic data, the
    promotion decision, the lineage), lineage.csv and lineage.md, and pipeline.json.

    Example:

    \b
        sonosynth pipeline demo --out runs/demo
        sonosynth pipeline demo --out runs/demo --from sam_synthetic
        sonosynth pipeline demo --set lora.engine.max_steps=20
    """
    from sonosynth.launch.pipeline import PipelineFailed, resolve_pipeline, run

    flags = {"out": out, "from_stage": from_stage, "only": only, "progress": progress,
             "tracking": {"uri": tracking_uri}}
    try:
        cfg = resolve_pipeline(recipe, flags, set_ or [])
        report = run(cfg)
    except PipelineFailed as err:
        _exit(err, 1)
    except USAGE_ERRORS as err:
        _exit(err, 2)
    except (StageFailed, StorageError) as err:
        _exit(err, 1)
    typer.echo("")
    typer.echo(report.text)


def promote(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registered model, e.g. sonosynth-sam.")],
    version: Annotated[str, typer.Option(help="The version to make champion.")],
    uri: Annotated[Optional[str], typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db).")] = None,
    reason: Annotated[str, typer.Option(help="Why, recorded on the version.")] = "promoted by an operator",
) -> None:
    """Make a model version champion by hand, without an evaluation.

    The version gets the alias champion; the champion it replaces keeps previous_champion
    and stays in the history, so `sonosynth rollback NAME` restores it. The decision
    (manual) and the reason are recorded as tags on the version. The pipeline's promote
    stage is the evaluated way: a challenger must beat the champion.

    Example:

    \b
        sonosynth promote sonosynth-sam --version 7 --uri http://mlflow:5000
    """
    from sonosynth.launch.promote import promote as do_promote

    try:
        d = do_promote(_client(uri), name, version, reason=reason)
    except USAGE_ERRORS as err:
        _exit(err, 2)
    typer.echo(f"{name}: {d.reason}; champion is version {d.champion_after}")


def rollback(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registered model, e.g. sonosynth-sam.")],
    uri: Annotated[Optional[str], typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db).")] = None,
) -> None:
    """Give the champion alias back to the previous champion.

    The previous champion comes from the model's champion history (every promotion and
    manual promote is recorded there), else from its previous_champion alias. The version
    rolled back from is tagged rolled_back. Run it again to go one more step back.

    Example:

    \b
        sonosynth rollback sonosynth-sam --uri http://mlflow:5000
    """
    from sonosynth.launch.promote import rollback as do_rollback

    try:
        d = do_rollback(_client(uri), name)
    except USAGE_ERRORS as err:
        _exit(err, 2)
    typer.echo(f"{name}: {d.reason}")


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
    pipeline(recipe, out=out, from_stage=None, only=None, tracking_uri=None, progress=progress, set_=set_)


def register(app: typer.Typer) -> None:
    """Add ``pipeline``, ``promote`` and ``rollback`` (and ``demo``, unless ``app`` has one) to ``app``."""
    app.command()(pipeline)
    app.command()(promote)
    app.command()(rollback)
    if not any((c.name or c.callback.__name__) == "demo" for c in app.registered_commands):
        app.command()(demo)
