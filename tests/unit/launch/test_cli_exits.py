"""Exit statuses: a usage error exits 2 with one line; a bug exits 1 and its traceback is kept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sonosynth.infra.config import Config
from sonosynth.infra.stage import Report, StageFailed, UsageError
from sonosynth.launch.cli import exits
from sonosynth.launch.cli.stage_verbs import stage_command
from sonosynth.launch.stages import Flag, Stage


class ToyConfig(Config):
    out: str = "runs/toy"
    """Where nothing is written."""
    steps: int = 1
    """How many steps."""
    error: str = ""
    """What run raises: a bug, usage, failed, or nothing."""


def toy_run(cfg: ToyConfig) -> Report:
    if cfg.error == "bug":
        return {}["a key a bug forgot"]
    if cfg.error == "value":
        raise ValueError("deep inside the stage")
    if cfg.error == "usage":
        raise UsageError("no dataset at runs/nowhere: run `sonosynth ingest` first")
    if cfg.error == "failed":
        raise StageFailed("too few samples passed QC")
    return Report(stage="toy", out=cfg.out, text=f"ran {cfg.steps} steps",
                  failed="half done" if cfg.error == "report" else None)


TOY = Stage("toy", "a stage for tests", lambda: (ToyConfig, toy_run), "Run the toy stage.\n\nExample: none.",
            (Flag("steps", "steps", "Steps.", int), Flag("error", "error", "What to raise.")), recipe_optional=True)


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Invoke the toy verb the way `sonosynth` runs a stage verb (with its global --debug)."""
    monkeypatch.delenv(exits.DEBUG_ENV, raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def options(debug: bool = typer.Option(False, "--debug")) -> None:
        exits.set_debug(debug)

    app.command("toy")(stage_command(TOY))
    return lambda *args: CliRunner().invoke(app, list(args))


def test_a_bug_in_a_stage_exits_1_and_its_traceback_goes_to_a_log_file(cli, tmp_path):
    res = cli("toy", "--error", "value")
    assert res.exit_code == 1, res.output
    assert "error: ValueError: deep inside the stage" in res.stderr
    assert "Traceback" not in res.stderr
    log = Path(re.search(r"the traceback is in (\S+)", res.stderr).group(1))
    assert log.parent == tmp_path and log.name.startswith("sonosynth-error-")
    text = log.read_text()
    assert "Traceback" in text and "in toy_run" in text and "ValueError: deep inside the stage" in text


@pytest.mark.parametrize("where", ["verb", "global"])
def test_debug_prints_the_traceback(cli, tmp_path, where):
    args = ["toy", "--error", "bug", "--debug"] if where == "verb" else ["--debug", "toy", "--error", "bug"]
    res = cli(*args)
    assert res.exit_code == 1
    assert "error: KeyError" in res.stderr and "Traceback" in res.stderr and "in toy_run" in res.stderr
    assert not list(tmp_path.glob("sonosynth-error-*"))


def test_usage_errors_exit_2_with_one_line(cli):
    res = cli("toy", "--set", "stpes=3")
    assert res.exit_code == 2 and "stpes: unknown key" in res.stderr and "Traceback" not in res.stderr
    res = cli("toy", "--set", "steps=many")
    assert res.exit_code == 2 and "steps" in res.stderr
    res = cli("toy", "no_such_recipe")
    assert res.exit_code == 2 and "no recipe 'no_such_recipe'" in res.stderr
    res = cli("toy", "--error", "usage")
    assert res.exit_code == 2 and res.stderr == "error: no dataset at runs/nowhere: run `sonosynth ingest` first\n"


def test_failures_exit_1_with_their_message(cli):
    res = cli("toy", "--error", "failed")
    assert res.exit_code == 1 and res.stderr == "error: too few samples passed QC\n"
    res = cli("toy", "--error", "report", "--steps", "4")
    assert res.exit_code == 1 and "ran 4 steps" in res.stdout and res.stderr == "error: half done\n"
    res = cli("toy", "--steps", "2", "--set", "steps=3")  # flags < --set
    assert res.exit_code == 0 and "ran 3 steps" in res.stdout


def test_the_real_cli_exits_2_on_a_bad_key_in_set(tmp_path):
    from sonosynth.launch.cli.app import app

    res = CliRunner().invoke(app, ["generate", "generate_tiny", "--out", str(tmp_path), "--set", "no_such_key=1"])
    assert res.exit_code == 2 and "no_such_key: unknown key" in res.stderr
    res = CliRunner().invoke(app, ["evaluate", "--dataset", str(tmp_path), "--split", "all", "--set", "splt=x"])
    assert res.exit_code == 2 and "splt: unknown key" in res.stderr


def test_a_bug_while_resolving_is_not_a_usage_error(monkeypatch, tmp_path):
    from sonosynth.launch.cli.app import app

    def broken_resolve(*args, **kwargs):
        raise ValueError("a bug in resolution")

    monkeypatch.delenv(exits.DEBUG_ENV, raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr("sonosynth.launch.recipes.resolve", broken_resolve)
    res = CliRunner().invoke(app, ["--debug", "generate", "generate_tiny"])
    assert res.exit_code == 1 and "error: ValueError: a bug in resolution" in res.stderr
    assert "in broken_resolve" in res.stderr
    res = CliRunner().invoke(app, ["generate", "generate_tiny"])
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    (log,) = tmp_path.glob("sonosynth-error-*.log")
    assert "in broken_resolve" in log.read_text()
