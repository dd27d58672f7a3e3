import pytest

from sonosynth.infra.config import ConfigError
from sonosynth.infra.jobdir import claim_output, offline_dir_for
from sonosynth.infra.storage import open_storage


def _claim(st, stage="ingest", identity=None, **kw):
    return claim_output(st, stage=stage, identity=identity or {"a": 1}, config_yaml="x: 1\n", **kw)


def test_first_claim_writes_record_and_config_then_same_job_resumes(tmp_path):
    st = open_storage(str(tmp_path))
    assert _claim(st) is False
    assert (tmp_path / "config.yaml").read_text() == "x: 1\n" and (tmp_path / "job.json").is_file()
    assert _claim(st) is True


def test_another_job_or_stage_is_refused_naming_the_keys_and_the_fix(tmp_path):
    st = open_storage(str(tmp_path))
    _claim(st, identity={"a": 1, "b": "x"})
    with pytest.raises(ConfigError, match=r"a: 1 there, 2 now.*another --out"):
        _claim(st, identity={"a": 2, "b": "x"})
    with pytest.raises(ConfigError, match="holds the output of `sonosynth ingest`, not generate"):
        _claim(st, stage="generate", identity={"a": 1, "b": "x"})
    with pytest.raises(ConfigError, match="overwrite=true"):
        _claim(st, identity={"a": 3, "b": "x"}, overwrite=False)
    assert _claim(st, identity={"a": 3, "b": "x"}, overwrite=True) is False
    assert _claim(st, identity={"a": 3, "b": "x"}) is True


def test_foreign_data_without_a_record_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "x-000000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="no sonosynth generate job wrote"):
        _claim(open_storage(str(tmp_path)), stage="generate", foreign_marker="shards/")
    assert not (tmp_path / "job.json").exists()


def test_offline_dir_is_beside_a_local_output_and_per_output_for_s3(tmp_path):
    assert offline_dir_for(str(tmp_path)) == tmp_path / "tracking-offline"
    a, b = offline_dir_for("s3://b/one"), offline_dir_for("s3://b/two")
    assert a != b and "sonosynth-tracking" in str(a)


def test_config_and_job_record_are_written_redacted_and_a_changed_password_is_still_a_resume(tmp_path, monkeypatch):
    import json

    from sonosynth.infra.jobdir import fingerprint

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sonosynth-leak-secret-abc123")
    st = open_storage(str(tmp_path))
    config = "tracking:\n  uri: http://u:leak-db-password-XYZ@mlflow:5000\nnote: sonosynth-leak-secret-abc123\n"
    identity = {"src": "https://u:leak-db-password-XYZ@data.example/x", "n": 3}
    assert claim_output(st, stage="ingest", identity=identity, config_yaml=config) is False
    written = (tmp_path / "config.yaml").read_text() + (tmp_path / "job.json").read_text()
    assert "leak-db-password-XYZ" not in written and "sonosynth-leak-secret-abc123" not in written
    assert "uri: http://u:***@mlflow:5000" in written and "note: ***AWS_SECRET_ACCESS_KEY" in written
    record = json.loads((tmp_path / "job.json").read_text())
    assert record["identity"] == {"src": "https://u:***@data.example/x", "n": 3}
    # the password is not what the job is: another one resumes it, and the fingerprint ignores it
    moved = {**identity, "src": "https://u:another-password@data.example/x"}
    assert fingerprint(moved) == fingerprint(identity) == record["fingerprint"]
    assert claim_output(st, stage="ingest", identity=moved, config_yaml=config) is True
    with pytest.raises(ConfigError, match=r"src: 'https://u:\*\*\*@data.example/x' there, "
                                          r"'https://u:\*\*\*@other.example/x' now") as info:
        claim_output(st, stage="ingest", identity={**identity, "src": "https://u:pw-2@other.example/x"},
                     config_yaml=config)
    assert "leak-db-password-XYZ" not in str(info.value) and "pw-2" not in str(info.value)


def test_a_record_written_before_redaction_still_resumes(tmp_path):
    import json

    st = open_storage(str(tmp_path))
    identity = {"src": "https://u:old-password-1@data.example/x"}
    (tmp_path / "job.json").write_text(json.dumps({"stage": "ingest", "identity": identity}))
    assert claim_output(st, stage="ingest", identity=identity, config_yaml="x: 1\n") is True
    assert "old-password-1" not in (tmp_path / "job.json").read_text()
