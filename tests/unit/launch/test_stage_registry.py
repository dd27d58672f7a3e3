"""Each stage is declared once, in ``launch/stages.py``, and everything else reads the registry.

- every registered stage is a verb taking RECIPE first, generated from its entry;
- every other verb is a known hand-written one, and ``submit``'s job verbs are the CLI's verbs
  minus the local ones (so ``submit`` and ``k8s render`` cannot disagree with the CLI);
- outside the stages' own modules, a stage's name is written once: in its registry entry;
- every flag sets a field its stage's config has.
"""

from __future__ import annotations

import ast
import io
import tokenize
import types
import typing
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel

from sonosynth.launch.cluster.submit import LOCAL_VERBS, OTHER_JOB_VERBS, job_verbs
from sonosynth.launch.stages import STAGES

REPO = Path(__file__).resolve().parents[3]
LAUNCH = REPO / "launch"
REGISTRY = LAUNCH / "stages.py"
KNOWN_LITERALS: set[tuple[str, str]] = set()


def cli_commands() -> dict[str, object]:
    from sonosynth.launch.cli.app import app

    return typer.main.get_command(app).commands


def stage_literals(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every string literal in ``source`` that is exactly a stage name."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.STRING:
            continue
        try:
            value = ast.literal_eval(tok.string)
        except (ValueError, SyntaxError):
            continue  # an f-string
        if value in names:
            found.append((tok.start[0], value))
    return found


def implementation_folders() -> set[Path]:
    """The packages under launch/ that hold a stage's config or run (they may name themselves)."""
    folders = set()
    for stage in STAGES.values():
        for obj in stage.load():
            module = Path(__import__(obj.__module__, fromlist=["_"]).__file__).resolve()
            if module.is_relative_to(LAUNCH) and module != REGISTRY:
                folders.add(module.parent)
    return folders


def test_every_stage_is_a_generated_verb_taking_the_recipe_first():
    commands = cli_commands()
    for name, stage in STAGES.items():
        assert name in commands, f"stage {name} has no verb"
        command = commands[name]
        assert getattr(command.callback, "stage", None) is stage, f"verb {name} is not generated from its entry"
        first = command.params[0]
        assert first.param_type_name == "argument" and first.name == "recipe" and first.metavar == "RECIPE"
        assert first.required is not stage.recipe_optional
        options = {opt for p in command.params for opt in p.opts}
        assert {f"--{f.name}" for f in stage.flags} | {"--set", "--debug"} <= options


def test_every_verb_that_runs_a_stage_is_registered_and_submit_knows_every_verb():
    commands = cli_commands()
    generated = {name for name, c in commands.items() if getattr(c.callback, "stage", None) is not None}
    assert generated == set(STAGES)
    hand_written = set(commands) - generated
    assert hand_written == set(OTHER_JOB_VERBS) | set(LOCAL_VERBS), \
        "a new hand-written verb: add it to OTHER_JOB_VERBS or LOCAL_VERBS in launch/cluster/submit.py"
    assert job_verbs() == sorted(set(commands) - set(LOCAL_VERBS))


def test_the_scan_finds_a_stage_name_written_outside_the_registry():
    source = 'def demo():\n    """Runs train-sam."""\n    return get_stage("train-sam"), f"{x}", "train"\n'
    assert stage_literals(source, set(STAGES)) == [(3, "train-sam")]


def test_a_stage_name_is_written_once_in_launch_outside_the_stages_own_modules():
    names = set(STAGES)
    skipped = implementation_folders()
    seen: dict[str, list[str]] = {name: [] for name in names}
    for path in sorted(LAUNCH.rglob("*.py")):
        if any(path.resolve().is_relative_to(folder) for folder in skipped):
            continue
        where = str(path.relative_to(REPO))
        for line, name in stage_literals(path.read_text(), names):
            if (where, name) not in KNOWN_LITERALS:
                seen[name].append(f"{where}:{line}")
    wrong = {name: places for name, places in seen.items()
             if len(places) != 1 or not places[0].startswith("launch/stages.py:")}
    assert not wrong, f"stage names written outside their registry entry (use STAGES / the entry): {wrong}"
    for where, name in KNOWN_LITERALS:  # a fixed exception is taken off the list
        assert (where, name) in {(where, n) for _, n in stage_literals((REPO / where).read_text(), names)}


def _field_type(cls: type, dotted: str) -> type:
    node: typing.Any = cls
    for part in dotted.split("."):
        while typing.get_origin(node) in (typing.Union, types.UnionType):
            node = next(a for a in typing.get_args(node) if a is not type(None))
        if typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        elif isinstance(node, type) and issubclass(node, BaseModel):
            assert part in node.model_fields, f"{cls.__name__}: no field {dotted!r}"
            node = node.model_fields[part].annotation
        else:
            pytest.fail(f"{cls.__name__}: {dotted!r} goes into {node!r}, which has no fields")
    return node


@pytest.mark.parametrize("name", list(STAGES))
def test_every_flag_sets_a_field_of_its_stage(name):
    stage = STAGES[name]
    for flag in stage.flags:
        _field_type(stage.config_class, flag.field)
