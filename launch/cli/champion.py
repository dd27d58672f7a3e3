"""``sonosynth champion``: a model's champion alias, moved or read by hand, and its lineage.

The evaluated way is the ``promote`` stage (a challenger must beat the champion, and the LoRA
behind it follows: ``sonosynth.launch.promote.champions``); these verbs are the operator's
overrides. ``register(app)`` adds the group to the ``sonosynth`` command.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from sonosynth.launch.cli.exits import exit_status

champion_app = typer.Typer(
    name="champion", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="A registered model's champion, by hand: make a version champion without an evaluation, "
         "give the alias back to the previous champion, or show the champion and its history. The "
         "evaluated way is `sonosynth promote RECIPE`.\n\n"
         "Example:\n\n"
         "\b\n"
         "    sonosynth champion show sonosynth-sam --uri http://mlflow:5000\n"
         "    sonosynth champion set sonosynth-sam --version 7 --reason hotfix\n"
         "    sonosynth champion rollback sonosynth-sam")

ModelName = Annotated[str, typer.Argument(metavar="NAME", help="Registered model, e.g. sonosynth-sam.")]
TrackingUri = Annotated[Optional[str], typer.Option(
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db).")]


def registry(uri: str | None):
    """The model registry at ``uri``: every champion verb goes through this one import."""
    from sonosynth.infra.model_registry import Registry
    from sonosynth.infra.tracking import TrackingConfig

    return Registry(TrackingConfig(uri=uri).resolved_uri())


@champion_app.command("set")
def set_champion(
    name: ModelName,
    version: Annotated[str, typer.Option(help="The version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why, recorded on the version.")] = "promoted by an operator",
    uri: TrackingUri = None,
) -> None:
    """Make a model version champion by hand, without an evaluation.

    The version gets the alias champion; the champion it replaces keeps previous_champion
    and stays in the history, so `sonosynth champion rollback NAME` restores it. The
    decision (manual) and the reason are recorded as tags on the version.

    Example:

    \b
        sonosynth champion set sonosynth-sam --version 7 \\
            --uri http://mlflow:5000
    """
    with exit_status():
        change = registry(uri).set_champion(name, version, reason=reason)
    typer.echo(f"{name}: {change.reason}; champion is version {change.champion_after}")


@champion_app.command("rollback")
def rollback(name: ModelName, uri: TrackingUri = None) -> None:
    """Give the champion alias back to the previous champion.

    The previous champion comes from the model's champion history (every promotion and
    `champion set` is recorded there), else from its previous_champion alias. The version
    rolled back from is tagged rolled_back. Run it again to go one more step back.

    When the promotion being undone also made its LoRA the LoRA's champion, the LoRA is
    rolled back with it (recorded on both); otherwise the LoRA's champion stays, and this
    says so.

    Example:

    \b
        sonosynth champion rollback sonosynth-sam --uri http://mlflow:5000
    """
    from sonosynth.launch.promote.champions import rollback_lineage

    with exit_status():
        models = registry(uri)
        change = models.rollback(name)
        lora = rollback_lineage(models, change)
    typer.echo(f"{name}: {change.reason}")
    if lora:
        typer.echo(lora)


@champion_app.command("show")
def show(
    name: ModelName,
    uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
) -> None:
    """Show a model's champion, previous champion and challenger, its lineage, and its history.

    The lineage of the champion: for a model trained on synthetic data (sonosynth-sam), the
    datasets it trained on, the synthetic set, the LoRA version that drew it (and whether that
    is the LoRA's champion) and the base model; for a LoRA, the promotion that made it
    champion. The history lists every version that was champion, oldest first, with the
    decision that made it champion (first, promoted, manual, lineage, rolled_back), when, and why.

    Example:

    \b
        sonosynth champion show sonosynth-sam --uri http://mlflow:5000
    """
    from sonosynth.launch.promote.champions import champion_lineage

    with exit_status():
        models = registry(uri)
        info = models.describe(name)
        info["lineage"] = champion_lineage(models, name)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    typer.echo(name)
    for alias in ("champion", "previous_champion", "challenger"):
        typer.echo(f"  {alias + ':':<19}{'version ' + info[alias] if info[alias] else '(none)'}")
    for line in lineage_lines(info["lineage"]):
        typer.echo(f"  {line}")
    typer.echo("  history (oldest first):" if info["history"] else "  history: (none)")
    for row in info["history"]:
        when = f" {row['decided_at']}" if row["decided_at"] else ""
        typer.echo(f"    version {row['version']:<4} {row['decision'] or '?':<12}{when}  {row['reason']}")


def lineage_lines(lineage: dict | None) -> list[str]:
    """The champion's lineage (``champions.champion_lineage``) as ``champion show`` prints it."""
    if not lineage:
        return []
    head = f"lineage of version {lineage['version']}:"
    if lineage.get("promoted_with"):
        model, _, version = lineage["promoted_with"].rpartition("/")
        status = lineage.get("promoted_with_status")
        rows = [("made champion with", f"{model} version {version}" + (f" ({status})" if status else "")),
                ("synthetic set", lineage.get("synthetic") or "(not recorded)")]
    elif lineage.get("error"):
        return [head, f"  {lineage['error']}"]
    else:
        loras = [f"{_version_words(r['lora'])} ({r['status']})" for r in lineage.get("loras") or []]
        rows = [("trained on", lineage.get("sources", "?")), ("synthetic set", lineage.get("synthetic", "?")),
                ("LoRA", "; ".join(loras) or "none"), ("base model", lineage.get("base_model", "?"))]
        if lineage.get("decision"):
            rows.append(("at promotion", lineage["decision"]))
    return [head, *(f"  {label + ':':<20}{value}" for label, value in rows)]


def _version_words(ref: str) -> str:
    model, _, version = ref.rpartition("/")
    return f"{model} version {version}" if version.isdigit() else ref


def register(app: typer.Typer) -> None:
    """Add ``champion`` to the sonosynth CLI."""
    app.add_typer(champion_app, name="champion")
