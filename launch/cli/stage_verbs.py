"""One verb per registered stage, generated from its registry entry (``launch/stages.py``).

``sonosynth STAGE RECIPE [flags] [--set KEY=VALUE ...] [--debug]``: the config is resolved as
defaults < recipe < flags < ``--set``; the stage runs and its report is printed. The exit
status follows ``launch/cli/exits.py``: errors while resolving the config and ``UsageError``
exit 2, a failed stage 1, anything else 1 with its traceback.
"""

from __future__ import annotations

import inspect
from enum import Enum
from typing import Annotated, Any, Callable, Optional

import typer

from sonosynth.infra.config import set_dotted
from sonosynth.infra.console import set_verbose
from sonosynth.infra.stage import Report
from sonosynth.launch.cli.exits import exit_status, failure, set_debug
from sonosynth.launch.stages import STAGES, Flag, Stage

DEBUG_HELP = "On a bug, print the traceback instead of writing it to a log file."
VERBOSE_HELP = ("Also print Ray's, DeepSpeed's and the workers' output, which otherwise goes to the log "
                "files named at the end (OUT/logs/).")


def flag_values(stage: Stage, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The given flags (``{flag name: value}``, None = not given) as a nested mapping of config
    fields, and the overrides that set fields to null (``--split all``)."""
    tree: dict[str, Any] = {}
    nulls = []
    for flag in stage.flags:
        value = values.get(flag.name)
        if isinstance(value, Enum):
            value = value.value
        if flag.switch and value is False:
            value = None
        if value is None:
            continue
        if flag.null_word is not None and value == flag.null_word:
            nulls.append(f"{flag.field}=null")
        else:
            set_dotted(tree, flag.field, value)
    return tree, nulls


def log_folder(cfg: Any) -> str:
    """Where a stage's libraries and workers log: OUT/logs (a pipeline's sections: OUT/SECTION/logs)."""
    out = cfg.root() if callable(getattr(cfg, "root", None)) else str(cfg.out)
    return f"{out.rstrip('/')}/logs"


def run_stage(stage: Stage, recipe: str | None, flags: dict[str, Any], overrides: list[str]) -> Report:
    """Resolve the stage's config, run it and print its report; exit 2 or 1 on errors."""
    from sonosynth.infra.console import logs_to

    with exit_status():
        cfg = stage.resolve(recipe, flags, overrides)
        with logs_to(log_folder(cfg), getattr(cfg, "storage", None)) as logs:
            try:
                report = stage.run(cfg)
            except BaseException:
                if logs.written:
                    typer.echo(f"logs: {logs.where}", err=True)
                raise
    typer.echo(stage.render(report))
    if logs.written:
        typer.echo(f"logs: {logs.where}")
    if report.failed:
        failure(report.failed)
    return report


def _option(flag: Flag) -> tuple[Any, Any]:
    """(annotation, default) of the command's parameter for ``flag``."""
    decls = [f"--{flag.name}/--no-{flag.name}" if flag.type is bool and not flag.switch else f"--{flag.name}"]
    option = typer.Option(*decls, help=flag.help, metavar=flag.metavar)
    if flag.switch:
        return Annotated[bool, option], False
    kind = Enum(f"{flag.name}_choice", [(c, c) for c in flag.choices], type=str) if flag.choices else flag.type
    return Annotated[Optional[kind], option], None


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def stage_command(stage: Stage) -> Callable[..., None]:
    """The typer command of ``stage``: its signature (the CLI) is built from the entry's flags."""
    recipe_type = Optional[str] if stage.recipe_optional else str
    recipe = typer.Argument(metavar="RECIPE", help=stage.recipe_help)
    params = [_param("recipe", Annotated[recipe_type, recipe], None if stage.recipe_optional else
                     inspect.Parameter.empty)]
    names = {}
    for i, flag in enumerate(stage.flags):
        names[f"flag_{i}"] = flag.name
        params.append(_param(f"flag_{i}", *_option(flag)))
    params.append(_param("overrides", Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help=stage.set_help)], None))
    params.append(_param("debug", Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)], False))
    params.append(_param("verbose", Annotated[bool, typer.Option("--verbose", help=VERBOSE_HELP)], False))

    def command(**kwargs: Any) -> None:
        if kwargs.pop("debug"):
            set_debug(True)
        if kwargs.pop("verbose"):
            set_verbose(True)
        overrides = list(kwargs.pop("overrides") or [])
        recipe = kwargs.pop("recipe")
        flags, nulls = flag_values(stage, {names[k]: v for k, v in kwargs.items()})
        run_stage(stage, recipe, flags, nulls + overrides)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = command.__qualname__ = stage.name.replace("-", "_")
    command.__doc__ = stage.help
    command.stage = stage  # type: ignore[attr-defined]  # which entry the verb was built from
    return command


def register(app: typer.Typer) -> None:
    """Add one verb per registered stage to ``app``."""
    for stage in STAGES.values():
        app.command(stage.name)(stage_command(stage))
