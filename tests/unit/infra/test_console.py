"""The console keeps sonosynth's lines; libraries' logging goes to the stage's log folder (local or S3)."""

from __future__ import annotations

import logging

from sonosynth.infra.console import DRIVER_LOG, configure, logs_to


def test_library_logging_goes_to_the_folder_and_sonosynth_warnings_to_the_console(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SONOSYNTH_VERBOSE", raising=False)
    configure()
    with logs_to(str(tmp_path / "logs")) as logs:
        logging.getLogger("ray.train").warning("the controller says hello")
        logging.getLogger("mlflow.store").info("creating tables")
        logging.getLogger("sonosynth.launch.test").warning("a sonosynth warning")
        logging.getLogger("sonosynth.launch.test").info("a sonosynth detail")
    err = capsys.readouterr().err
    assert "a sonosynth warning" in err
    assert "hello" not in err and "creating tables" not in err and "a sonosynth detail" not in err
    text = (tmp_path / "logs" / DRIVER_LOG).read_text()
    for line in ("the controller says hello", "creating tables", "a sonosynth warning", "a sonosynth detail"):
        assert line in text
    assert DRIVER_LOG in logs.written and logs.where == str(tmp_path / "logs")


def test_verbose_prints_the_libraries_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SONOSYNTH_VERBOSE", "1")
    configure()
    with logs_to(str(tmp_path / "logs")):
        logging.getLogger("ray.train").warning("the controller says hello")
    assert "the controller says hello" in capsys.readouterr().err
    assert "the controller says hello" in (tmp_path / "logs" / DRIVER_LOG).read_text()


def test_a_stage_that_logs_nothing_leaves_no_folder(tmp_path):
    configure()
    with logs_to(str(tmp_path / "someone-elses" / "logs")) as logs:
        pass
    assert not logs.written and not (tmp_path / "someone-elses").exists()


def test_an_inner_folder_takes_the_lines_while_it_is_open(tmp_path):
    configure()
    with logs_to(str(tmp_path / "pipeline")):
        with logs_to(str(tmp_path / "section")):
            logging.getLogger("ray").warning("in the section")
        logging.getLogger("ray").warning("after the section")
    assert "in the section" in (tmp_path / "section" / DRIVER_LOG).read_text()
    outer = (tmp_path / "pipeline" / DRIVER_LOG).read_text()
    assert "after the section" in outer and "in the section" not in outer


def test_secrets_never_reach_the_log_files(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    configure()
    with logs_to(str(tmp_path / "logs")):
        logging.getLogger("botocore").warning("signing with s3cr3t-value-123")
    text = (tmp_path / "logs" / DRIVER_LOG).read_text()
    assert "signing with" in text and "s3cr3t-value-123" not in text


def test_an_s3_folder_is_uploaded_when_the_stage_ends(s3_bucket):
    from sonosynth.infra.storage import open_storage

    configure()
    where = f"s3://{s3_bucket}/job/logs"
    with logs_to(where) as logs:
        logging.getLogger("deepspeed").warning("op built")
        assert not open_storage(where).exists(DRIVER_LOG)  # written here first, uploaded at the end
    assert DRIVER_LOG in logs.written
    assert "op built" in open_storage(where).get_text(DRIVER_LOG)


def test_mlflow_imported_after_configure_logs_to_the_folder_not_the_console(tmp_path):
    """MLflow gives itself a console handler when imported: a fresh process, as the CLI is."""
    import subprocess
    import sys

    code = (f"from sonosynth.infra.console import configure, logs_to\nconfigure()\n"
            f"with logs_to({str(tmp_path / 'logs')!r}):\n"
            f"    from mlflow import MlflowClient\n"
            f"    MlflowClient('sqlite:///{tmp_path / 'mlflow.db'}').search_experiments()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")})
    assert done.returncode == 0, done.stderr
    assert "Creating initial MLflow database tables" not in done.stdout + done.stderr
    assert "Creating initial MLflow database tables" in (tmp_path / "logs" / DRIVER_LOG).read_text()


def test_logs_the_store_refuses_are_kept_here_and_the_stage_goes_on(s3_bucket, capsys):
    configure()
    where = f"s3://{s3_bucket}-gone/job/logs"  # no such bucket
    with logs_to(where) as logs:
        logging.getLogger("ray").warning("worth keeping")
    err = capsys.readouterr().err
    assert f"could not upload the logs to {where}" in err
    assert "worth keeping" in (logs.local / DRIVER_LOG).read_text()
