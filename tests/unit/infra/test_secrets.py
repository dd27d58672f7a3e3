"""infra/secrets: what is masked (URI passwords, secret environment values) and what is not; and
what `sonosynth submit` hands a Ray job: never a secret (stripped with a warning, or refused)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sonosynth.infra.secrets import (MASK, has_uri_password, is_secret_name, redact, redact_obj, redact_uri,
                                     secret_values, strip_uri_credentials)
from sonosynth.launch.cluster import submit as sub

SONOSYNTH = str(Path(sys.executable).with_name("sonosynth"))
ENV = {"AWS_SECRET_ACCESS_KEY": "sonosynth-leak-secret-abc123", "AWS_ACCESS_KEY_ID": "AKIASONOSYNTHLEAKTEST1",
       "RAY_AUTH_TOKEN": "tok-0123456789abcdef", "MLFLOW_TRACKING_PASSWORD": "hunter2-but-longer",
       "RAY_AUTH_TOKEN_PATH": "/home/me/.ray/auth_token", "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token-file",
       "RAY_AUTH_MODE": "token-mode", "HOME": "/home/me", "SOME_TOKEN": "short", "WANDB_API_KEY": "wandb-key-123456"}


@pytest.mark.parametrize("uri, masked", [
    ("http://sonosynth:leak-db-password-XYZ@127.0.0.1:5000", "http://sonosynth:***@127.0.0.1:5000"),
    ("postgresql+psycopg2://mlflow:s3cr:et@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
    ("https://u:p@ss@host/path@x", "https://u:***@host/path@x"),  # a password may hold '@'; a path may too
    ("http://:only-a-token@host", "http://:***@host"),
    ("http://host:5000/x", "http://host:5000/x"),  # a port is not a password
    ("http://host:8080/a@b", "http://host:8080/a@b"),
    ("ssh://git@github.com/o/r", "ssh://git@github.com/o/r"),  # a bare user is not a secret
    ("s3://bucket/key", "s3://bucket/key"),
    (None, None), ("", ""),
])
def test_redact_uri_masks_the_password_only(uri, masked):
    assert redact_uri(uri) == masked
    assert has_uri_password(uri) == (masked != uri)


def test_every_uri_in_a_text_is_masked_and_quotes_end_a_uri():
    text = 'a: "http://u:pw1@h1/x", b: http://v:pw2@h2,http://w:pw3@h3 c'
    out = redact_uri(text)
    assert "pw1" not in out and "pw2" not in out and "pw3" not in out
    assert out == 'a: "http://u:***@h1/x", b: http://v:***@h2,http://w:***@h3 c'


def test_secret_names_are_found_by_name_and_paths_are_not_secrets():
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "WANDB_API_KEY", "db_password"):
        assert is_secret_name(name), name
    for name in ("RAY_AUTH_TOKEN_PATH", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "HOME", "AWS_ENDPOINT_URL"):
        assert not is_secret_name(name), name


def test_secret_values_skip_short_values_and_paths():
    values = secret_values(ENV)
    assert set(values.values()) == {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN",
                                    "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"}
    assert secret_values({"AWS_SECRET_ACCESS_KEY": "testing"}) == {}  # moto's: would mask ordinary words


def test_redact_masks_uri_passwords_and_secret_values_naming_the_variable():
    text = ("key AKIASONOSYNTHLEAKTEST1 secret sonosynth-leak-secret-abc123 at http://me:hunter2-but-longer@h "
            "home /home/me token file /home/me/.ray/auth_token short")
    out = redact(text, ENV)
    assert out == (f"key {MASK}AWS_ACCESS_KEY_ID secret {MASK}AWS_SECRET_ACCESS_KEY at http://me:{MASK}@h "
                   f"home /home/me token file /home/me/.ray/auth_token short")
    assert redact(text, {}) == redact_uri(text)  # no environment: URIs only
    assert redact("", ENV) == "" and redact(None, ENV) is None  # type: ignore[arg-type]


def test_redact_reads_this_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("SONOSYNTH_TEST_SECRET", "value-of-a-test-secret")
    assert redact("x value-of-a-test-secret y") == f"x {MASK}SONOSYNTH_TEST_SECRET y"


def test_redact_obj_walks_dicts_lists_tuples_and_keys_leaving_other_values():
    obj = {"tracking": {"uri": "http://u:pw-123456@h", "timeout": 10, "on": True, "none": None},
           "list": ["sonosynth-leak-secret-abc123", 1.5], "tuple": ("http://a:b@c",),
           "sonosynth-leak-secret-abc123": "as a key"}
    out = redact_obj(obj, ENV)
    assert out == {"tracking": {"uri": "http://u:***@h", "timeout": 10, "on": True, "none": None},
                   "list": [f"{MASK}AWS_SECRET_ACCESS_KEY", 1.5], "tuple": ("http://a:***@c",),
                   f"{MASK}AWS_SECRET_ACCESS_KEY": "as a key"}
    assert "pw-123456" not in json.dumps(out) and obj["tracking"]["uri"] == "http://u:pw-123456@h"  # a copy


def test_strip_uri_credentials_removes_user_and_password_and_keeps_a_bare_user():
    assert strip_uri_credentials("http://sonosynth:pw@127.0.0.1:5000/x") == ("http://127.0.0.1:5000/x", True)
    assert strip_uri_credentials("https://u:p@ss@host") == ("https://host", True)
    assert strip_uri_credentials("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", False)
    assert strip_uri_credentials("ssh://git@host/r") == ("ssh://git@host/r", False)


# -- what submit hands a job -------------------------------------------------------------------

@pytest.fixture
def client_env(monkeypatch):
    for name in sub.DEFAULT_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://sonosynth:leak-db-password-XYZ@mlflow.example:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.example:9000")
    return monkeypatch


def test_a_password_in_the_tracking_uri_is_stripped_from_the_job_with_a_warning(client_env):
    env, names, warnings = sub.runtime_env(None, "image")
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://s3.example:9000"
    assert names == ["MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"]
    [warning] = warnings
    assert "MLFLOW_TRACKING_URI holds a password" in warning and "MLFLOW_TRACKING_PASSWORD" in warning
    assert "Secret" in warning and "leak-db-password" not in warning
    text = json.dumps(env)
    assert not any(v in text for v in ENV.values() if len(v) >= 8 and not v.startswith("/"))
    client_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert sub.runtime_env(None, "image")[2] == []  # nothing to say


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN",
                                  "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY", "SOME_TOKEN"])
def test_env_of_a_secret_named_variable_is_refused_pointing_at_the_clusters_secret(client_env, name):
    with pytest.raises(sub.SubmitUsageError, match=f"--env {name}: {name} holds a secret.*Secret") as info:
        sub.runtime_env(None, "image", [name])
    assert ENV[name] not in str(info.value)


def test_env_whose_value_holds_a_password_or_a_secret_is_refused(client_env):
    client_env.setenv("DATABASE_URL", "postgresql://u:db-password-1@db/x")
    with pytest.raises(sub.SubmitUsageError, match=r"--env DATABASE_URL holds a URI with a password "
                                                   r"\(postgresql://u:\*\*\*@db/x\)") as info:
        sub.job_env_vars(["DATABASE_URL"])
    assert "db-password-1" not in str(info.value)
    client_env.setenv("CONNECT", "key=sonosynth-leak-secret-abc123")
    with pytest.raises(sub.SubmitUsageError, match="--env CONNECT holds the value of AWS_SECRET_ACCESS_KEY"):
        sub.job_env_vars(["CONNECT"])
    client_env.setenv("PLAIN", "nothing-secret-here")
    assert sub.job_env_vars(["PLAIN"])[0]["PLAIN"] == "nothing-secret-here"  # ordinary names still travel
    with pytest.raises(sub.SubmitUsageError, match="no such variable"):
        sub.job_env_vars(["NOT_SET_ANYWHERE"])


def test_arguments_and_a_local_recipe_holding_a_secret_are_refused(client_env, tmp_path):
    with pytest.raises(sub.SubmitUsageError, match=r"the argument 'tracking.uri=http://u:\*\*\*@h:5000' holds a URI"):
        sub.check_secrets(["generate", "generate_tiny", "--set", "tracking.uri=http://u:pw-9@h:5000"])
    with pytest.raises(sub.SubmitUsageError, match="holds the value of RAY_AUTH_TOKEN"):
        sub.check_secrets(["config", "--set", "x=tok-0123456789abcdef"])
    sub.check_secrets(["generate", "generate_tiny", "--set", "tracking.uri=http://mlflow:5000"])  # fine
    recipe = "tracking:\n  uri: postgresql://mlflow:db-pw-7@db/mlflow\n"
    with pytest.raises(sub.SubmitUsageError, match="the recipe holds a URI with a password"):
        sub.runtime_env(None, "image", recipe_yaml=recipe)


def test_submit_refuses_a_secret_before_it_contacts_any_cluster(client_env, tmp_path):
    # no address anywhere: had submit got as far as the cluster, the error would say so
    client_env.delenv("RAY_ADDRESS", raising=False)
    client_env.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(sub.SubmitUsageError, match="holds a secret"):
        sub.submit(["config", "generate"], env_names=["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(sub.SubmitUsageError, match="holds a URI with a password"):
        sub.submit(["config", "generate", "--set", "tracking.uri=http://u:pw-9@h"])
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("tracking:\n  uri: http://u:pw-in-a-recipe@h:5000\n")
    with pytest.raises(sub.SubmitUsageError, match="the recipe holds a URI with a password"):
        sub.submit(["generate", str(recipe)])
    with pytest.raises(sub.SubmitUsageError, match="no cluster given"):
        sub.submit(["config", "generate"])


def test_the_submit_command_exits_2_on_a_secret_env_and_prints_no_value(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_SECRET_ACCESS_KEY": ENV["AWS_SECRET_ACCESS_KEY"]}
    res = subprocess.run([SONOSYNTH, "submit", "--address", "http://127.0.0.1:9", "--env", "AWS_SECRET_ACCESS_KEY",
                          "--", "config", "generate"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "AWS_SECRET_ACCESS_KEY holds a secret" in res.stderr and "sonosynth-s3" in res.stderr
    assert ENV["AWS_SECRET_ACCESS_KEY"] not in res.stdout + res.stderr


def test_log_redaction_masks_messages_arguments_and_tracebacks(monkeypatch):
    import io
    import logging

    from sonosynth.infra.secrets import install_log_redaction

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sonosynth-leak-secret-abc123")
    stream = io.StringIO()
    logger = logging.getLogger("sonosynth.test_secrets")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        install_log_redaction(logger)
        install_log_redaction(logger)  # once is enough
        assert len(handler.filters) == 1
        logger.warning("MLflow at %s failed", "http://u:leak-db-password-XYZ@h:5000")
        try:
            raise RuntimeError("key sonosynth-leak-secret-abc123 refused")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "MLflow at http://u:***@h:5000 failed" in text and "***AWS_SECRET_ACCESS_KEY refused" in text
    assert "leak-db-password-XYZ" not in text and "sonosynth-leak-secret-abc123" not in text


def test_secret_values_survive_a_variable_removed_while_they_read():
    from collections.abc import Mapping

    class Vanishing(Mapping):
        """An environment whose MLflow telemetry variable is removed between listing and reading."""

        data = {"_MLFLOW_TELEMETRY_SESSION_ID": "x", "MY_API_TOKEN": "tok-0123456789"}

        def __iter__(self):
            return iter(list(self.data))

        def __len__(self):
            return len(self.data)

        def __getitem__(self, name):
            if name.startswith("_MLFLOW"):
                raise KeyError(name)
            return self.data[name]

    with pytest.raises(KeyError):
        dict(Vanishing())  # what a plain copy of the environment did
    assert secret_values(Vanishing()) == {"tok-0123456789": "MY_API_TOKEN"}
