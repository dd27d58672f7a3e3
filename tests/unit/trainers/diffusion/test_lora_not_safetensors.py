"""A LoRA whose weights are not safetensors is refused, naming the file; it is never unpickled."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sonosynth.infra.stage import StageFailed
from sonosynth.trainers.diffusion.lora import WEIGHTS_NAME, LoraFileError, check_lora_weights
from sonosynth.trainers.diffusion.sampler import Sampler, SamplerConfig, resolve_lora


class Boom:
    """Unpickling this writes a file: the proof that something ran pickle on it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def lora_folder(tmp_path, weights: bytes | None = None):
    folder = tmp_path / "lora"
    folder.mkdir(parents=True)
    save_file({"unet.down.lora_A.weight": torch.zeros(4, 8)}, str(folder / WEIGHTS_NAME), metadata={"r": "4"})
    if weights is not None:
        (folder / WEIGHTS_NAME).write_bytes(weights)
    (folder / "lineage.json").write_text(json.dumps({"mode": "joint", "resolution": 64}))
    return folder


def test_a_safetensors_lora_passes(tmp_path):
    folder = lora_folder(tmp_path)
    assert check_lora_weights(folder) == folder / WEIGHTS_NAME
    assert resolve_lora(str(folder))[0] == folder


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "random bytes", "truncated", "empty"])
def test_weights_that_are_not_safetensors_name_the_file_and_the_layout(tmp_path, kind):
    marker = tmp_path / "unpickled"
    whole = (lora_folder(tmp_path / "whole") / WEIGHTS_NAME).read_bytes()
    if kind == "torch.save":
        torch.save({"w": torch.zeros(2), "boom": Boom(marker)}, tmp_path / "t.pt")
    weights = {"pickle": pickle.dumps(Boom(marker)),
               "torch.save": (tmp_path / "t.pt").read_bytes() if kind == "torch.save" else b"",
               "random bytes": bytes(range(256)) * 3,
               "truncated": whole[:-7],
               "empty": b""}[kind]
    folder = lora_folder(tmp_path, weights)
    for load in (lambda: check_lora_weights(folder), lambda: resolve_lora(str(folder)),
                 lambda: Sampler(SamplerConfig(), device="cpu", lora_dir=folder, lora_sha256="x")):
        with pytest.raises(LoraFileError) as err:
            load()
        msg = str(err.value)
        assert f"{folder / WEIGHTS_NAME} is not a readable safetensors file" in msg
        assert f"a LoRA folder must hold {WEIGHTS_NAME}" in msg and isinstance(err.value, StageFailed)
    assert not marker.exists()


def test_a_lora_folder_without_weights_or_with_bad_lineage(tmp_path):
    folder = lora_folder(tmp_path)
    (folder / "lineage.json").write_text("{not json")
    with pytest.raises(LoraFileError, match="lineage.json is not readable JSON"):
        Sampler(SamplerConfig(), device="cpu", lora_dir=folder, lora_sha256="x")
    (folder / WEIGHTS_NAME).unlink()
    (folder / "pytorch_lora_weights.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(LoraFileError, match=f"holds no {WEIGHTS_NAME}"):
        check_lora_weights(folder)
