"""A checkpoint folder without its completion marker is never loaded as if complete."""

from __future__ import annotations

import json
import logging

import pytest

from sonosynth.infra.stage import StageFailed
from sonosynth.infra.storage import LocalStorage
from sonosynth.trainers.checkpoint import COMPLETE, CheckpointError, CheckpointStore


def checkpoint(storage: LocalStorage, step: int, *, marker: str | None = "ok") -> None:
    tag = f"step-{step:08d}"
    storage.put_bytes(f"checkpoints/{tag}/mp_rank_00_model_states.pt", b"weights")
    if marker == "ok":
        storage.put_text(f"checkpoints/{tag}/{COMPLETE}", json.dumps(
            {"step": step, "tag": tag, "world_size": 1, "files": [f"checkpoints/{tag}/mp_rank_00_model_states.pt"]}))
    elif marker is not None:
        storage.put_text(f"checkpoints/{tag}/{COMPLETE}", marker)


def test_resume_skips_a_newer_incomplete_checkpoint_with_a_warning(tmp_path, caplog):
    storage = LocalStorage(tmp_path)
    checkpoint(storage, 10)
    checkpoint(storage, 20)
    checkpoint(storage, 30, marker=None)  # killed while saving
    checkpoint(storage, 40, marker='{"step": 40, "tag": "step-000')  # marker cut short
    with caplog.at_level(logging.WARNING, logger="sonosynth.trainers.checkpoint"):
        assert CheckpointStore(storage).latest()["tag"] == "step-00000020"
    text = caplog.text
    assert f"{tmp_path}/checkpoints/step-00000030 has no valid {COMPLETE}" in text
    assert "resuming from step-00000020" in text
    assert f"{tmp_path}/checkpoints/step-00000040/{COMPLETE} is damaged" in text


def test_only_incomplete_checkpoints_start_over_with_a_warning(tmp_path, caplog):
    storage = LocalStorage(tmp_path)
    checkpoint(storage, 10, marker=None)
    with caplog.at_level(logging.WARNING, logger="sonosynth.trainers.checkpoint"):
        assert CheckpointStore(storage).latest() is None
    assert "step-00000010" in caplog.text and "starting from step 0" in caplog.text


@pytest.mark.parametrize("marker", [None, "not json", '{"step": 30}'])
def test_asking_for_an_incomplete_checkpoint_names_the_folder_and_the_marker(tmp_path, marker):
    storage = LocalStorage(tmp_path)
    checkpoint(storage, 20)
    checkpoint(storage, 30, marker=marker)
    store = CheckpointStore(storage)
    for ask in (lambda: store.record("step-00000030"), lambda: store.load(None, "step-00000030", world=1)):
        with pytest.raises(CheckpointError) as err:
            ask()
        msg = str(err.value)
        assert f"{tmp_path}/checkpoints/step-00000030 has no valid {COMPLETE}" in msg and "step-00000020" in msg
        assert isinstance(err.value, StageFailed)  # the CLI prints one line and exits 1
    assert store.record("step-00000020")["step"] == 20


def test_a_complete_checkpoint_missing_a_listed_file_is_refused(tmp_path):
    storage = LocalStorage(tmp_path)
    checkpoint(storage, 10)
    storage.delete("checkpoints/step-00000010/mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="lacks 1 of the files its _COMPLETE.json lists"):
        CheckpointStore(storage).load(None, "step-00000010", world=1)
