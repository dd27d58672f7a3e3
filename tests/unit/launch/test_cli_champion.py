"""``sonosynth champion set / rollback / show`` on a local MLflow store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

NAME = "sonosynth-champion-test"


@pytest.fixture
def store(tmp_path):
    """A registry with three versions of NAME, and the verbs run against it."""
    from mlflow import MlflowClient

    from sonosynth.launch.cli.app import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)
    for _ in range(3):
        (tmp_path / "model").mkdir(exist_ok=True)
        client.create_model_version(NAME, str(tmp_path / "model"))

    def cli(*args: str):
        return CliRunner().invoke(app, ["champion", *args, "--uri", uri])

    return client, cli


def test_set_show_and_rollback(store):
    client, cli = store
    res = cli("show", NAME)
    assert res.exit_code == 0 and "champion:          (none)" in res.stdout and "history: (none)" in res.stdout

    assert cli("set", NAME, "--version", "1").exit_code == 0
    res = cli("set", NAME, "--version", "3", "--reason", "hotfix")
    assert res.exit_code == 0 and "hotfix (champion was version 1); champion is version 3" in res.stdout
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"

    res = cli("show", NAME)
    assert res.exit_code == 0, res.output
    assert "champion:          version 3" in res.stdout and "previous_champion: version 1" in res.stdout
    assert "version 3    manual" in res.stdout and "hotfix (champion was version 1)" in res.stdout
    info = json.loads(cli("show", NAME, "--json").stdout)
    assert [r["version"] for r in info["history"]] == ["1", "3"] and info["previous_champion"] == "1"

    res = cli("rollback", NAME)
    assert res.exit_code == 0 and "from version 3 to version 1" in res.stdout
    assert client.get_model_version(NAME, "3").tags["sonosynth.decision"] == "rolled_back"
    res = cli("rollback", NAME)
    assert res.exit_code == 2 and "no previous champion" in res.stderr


def test_unknown_model_or_version_is_a_usage_error(store):
    _, cli = store
    res = cli("set", NAME, "--version", "99")
    assert res.exit_code == 2 and "has no version 99" in res.stderr
    res = cli("show", "no-such-model")
    assert res.exit_code == 2 and "no registered model 'no-such-model'" in res.stderr
