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
