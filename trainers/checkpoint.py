"""DeepSpeed checkpoints kept in any storage (local folder or ``s3://``), resumable by step.

Each rank saves its own DeepSpeed files to a local temp folder and uploads them under
``checkpoints/step-<8 digits>/``; after a barrier rank 0 writes ``_COMPLETE.json`` last. A
checkpoint without it (a job killed while saving), or with a damaged one, is never loaded: a
resume skips it with a warning naming it (and continues from the last complete one), asking for
it by name (``record``) is a ``CheckpointError`` naming the folder and the marker, and the next
save removes it. Only trainable weights are saved (``exclude_frozen_parameters``): a LoRA
checkpoint of SD 1.5 is megabytes, not gigabytes.

The best evaluation so far (``engine.best_metric``) keeps its trainable weights (and buffers)
in ``best/step-<8 digits>.pt``: the engine exports them as the job's model at the end. A
best file is kept while the current best or a kept checkpoint refers to it.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sonosynth.infra.stage import StageFailed
from sonosynth.infra.storage import Storage

PREFIX = "checkpoints"
COMPLETE = "_COMPLETE.json"
BEST = "best"
log = logging.getLogger(__name__)


class CheckpointError(StageFailed):
    """A checkpoint cannot be used for this job; the message says why and what to do (exit 1)."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def best_key(step: int) -> str:
    return f"{BEST}/{tag_for(step)}.pt"


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state minus its frozen parameters (what a checkpoint keeps), on the CPU."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k not in frozen}


class CheckpointStore:
    def __init__(self, storage: Storage, keep: int = 2):
        self.storage = storage
        self.keep = keep

    def _marker(self, tag: str) -> dict[str, Any] | None:
        """The completion record of checkpoint ``tag``; None when it has none, or a damaged one."""
        key = f"{PREFIX}/{tag}/{COMPLETE}"
        if not self.storage.exists(key):
            return None
        try:
            record = json.loads(self.storage.get_text(key))
            if record["tag"] == tag and isinstance(record["step"], int) and isinstance(record["files"], list):
                return record
        except (ValueError, KeyError, TypeError):
            pass
        log.warning("%s is damaged; checkpoint %s is treated as incomplete", self.storage.url(key), tag)
        return None

    def _tags(self) -> list[str]:
        """Every checkpoint folder, complete or not, in step order."""
        return sorted({k.split("/")[1] for k in self.storage.list(f"{PREFIX}/") if k.count("/") >= 2})

    def completed(self) -> list[dict[str, Any]]:
        """Records of complete checkpoints, oldest first."""
        records = [r for r in map(self._marker, self._tags()) if r is not None]
        return sorted(records, key=lambda r: r["step"])

    def latest(self) -> dict[str, Any] | None:
        """The last complete checkpoint (what a resume loads); later incomplete ones are skipped with a warning."""
        done = self.completed()
        last = done[-1] if done else None
        complete = {r["tag"] for r in done}
        for tag in self._tags():
            if tag not in complete and (last is None or tag > last["tag"]):
                log.warning("checkpoint %s has no valid %s (its job stopped while saving it): not loaded; %s",
                            self.storage.url(f"{PREFIX}/{tag}"), COMPLETE,
                            f"resuming from {last['tag']}" if last else "starting from step 0")
        return last

    def record(self, tag: str) -> dict[str, Any]:
        """The record of checkpoint ``tag`` (``step-00000040``), asked for by name; a CheckpointError
        naming the folder and the missing marker when it is not complete."""
        record = self._marker(tag)
        if record is None:
            done = ", ".join(r["tag"] for r in self.completed()) or "none"
            raise CheckpointError(
                f"{self.storage.url(f'{PREFIX}/{tag}')} has no valid {COMPLETE}: the checkpoint is incomplete (its "
                f"job stopped while saving it) and is never loaded; load a complete one (here: {done}), or re-run "
                "the job to resume from the last complete one")
        return record

    def save(self, engine, step: int, client_state: dict[str, Any], *, rank: int, world: int) -> None:
        """Every rank calls this (DeepSpeed's save is collective)."""
        tag = tag_for(step)
        with tempfile.TemporaryDirectory(prefix="sonosynth-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=True)
            for path in sorted((Path(tmp) / tag).rglob("*")):
                if path.is_file():
                    self.storage.put_file(f"{PREFIX}/{tag}/{path.relative_to(Path(tmp) / tag)}", path)
        dist.barrier()
        if rank == 0:
            files = [k for k in self.storage.list(f"{PREFIX}/{tag}/") if not k.endswith(COMPLETE)]
            record = {"step": step, "tag": tag, "world_size": world, "files": files, **client_state}
            self.storage.put_text(f"{PREFIX}/{tag}/{COMPLETE}", json.dumps(record, indent=1))
            self._prune(keep_step=step)
        dist.barrier()

    def _prune(self, keep_step: int) -> None:
        done = [r["step"] for r in self.completed()]
        stale = set(done[:-self.keep]) if self.keep > 0 else set()
        all_tags = {k.split("/")[1] for k in self.storage.list(f"{PREFIX}/")}
        incomplete = all_tags - {tag_for(s) for s in done}
        for tag in sorted({tag_for(s) for s in stale if s != keep_step} | incomplete):
            keys = self.storage.list(f"{PREFIX}/{tag}/")
            for key in sorted(keys, key=lambda k: k.endswith(COMPLETE)):  # the marker goes last
                self.storage.delete(key)

    def load(self, engine, record: dict[str, Any] | str, *, world: int) -> dict[str, Any]:
        """Restore weights, optimizer and schedule on every rank; returns the client state.
        ``record`` is a complete checkpoint's record, or its tag (checked by ``record``)."""
        if isinstance(record, str):
            record = self.record(record)
        if record["world_size"] != world:
            raise CheckpointError(
                f"checkpoint {record['tag']} in {self.storage.url(PREFIX)} was written by "
                f"{record['world_size']} workers and this job has {world}: resume with "
                f"--set engine.workers={record['world_size']}, or start over in a new --set out=...")
        tag = record["tag"]
        missing = [k for k in record["files"] if not self.storage.exists(k)]
        if missing:
            raise CheckpointError(f"checkpoint {self.storage.url(f'{PREFIX}/{tag}')} lacks {len(missing)} of the "
                                  f"files its {COMPLETE} lists (e.g. {missing[0]}); delete the folder to resume "
                                  "from the previous complete checkpoint, or start over in a new --set out=...")
        with tempfile.TemporaryDirectory(prefix="sonosynth-ckpt-") as tmp:
            for key in record["files"]:
                dest = Path(tmp) / tag / key.split(f"{tag}/", 1)[1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.storage.get_bytes(key))
            path, client_state = engine.load_checkpoint(tmp, tag=tag, load_module_strict=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.storage.url(f'{PREFIX}/{tag}')}")
        return client_state or {}

    # -- the best evaluation's weights ----------------------------------------------------------
    def save_best(self, module: torch.nn.Module, step: int) -> str:
        """Rank 0: keep the trainable weights of ``step``; returns their key."""
        key = best_key(step)
        with tempfile.TemporaryDirectory(prefix="sonosynth-best-") as tmp:
            path = Path(tmp) / "weights.pt"
            torch.save(trainable_state(module), path)
            self.storage.put_file(key, path)
        return key

    def load_best(self, module: torch.nn.Module, step: int) -> None:
        """Put the weights kept for ``step`` back into ``module``."""
        key = best_key(step)
        if not self.storage.exists(key):
            raise CheckpointError(f"{self.storage.url(key)} (the best evaluation's weights) is missing; "
                                  f"start over in a new --set out=..., or set engine.best_metric=null")
        state = torch.load(io.BytesIO(self.storage.get_bytes(key)), map_location="cpu", weights_only=True)
        result = module.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"{self.storage.url(key)} holds weights this model does not have "
                                  f"({', '.join(result.unexpected_keys[:4])} ...)")

    def prune_best(self, keep_steps: set[int]) -> None:
        """Delete kept best weights except those of ``keep_steps``."""
        keep = {best_key(s) for s in keep_steps}
        for key in self.storage.list(f"{BEST}/"):
            if key not in keep:
                self.storage.delete(key)

    def best_steps_in_use(self) -> set[int]:
        """Steps whose best weights a complete checkpoint refers to (a resume may need them)."""
        steps = set()
        for record in self.completed():
            best = (record.get("state") or {}).get("best")
            if best:
                steps.add(int(best["step"]))
        return steps
