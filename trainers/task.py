"""The task contract: what a recipe family (LoRA, SAM, classifier) gives the training engine.

``TrainTask`` is built on every rank as ``TrainTask(cfg, ctx)``; ``WorkerContext`` is the
rank's view of the job (rank, world, device, output storage, the current step).
docs/architecture.md has the contract on one page with a toy task as the example.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from sonosynth.infra.storage import Storage
from sonosynth.infra.tracking import Tracker


@dataclass
class WorkerContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    storage: Storage
    step: int = 0
    """While training: the 0-based step being trained; while evaluating: the steps done (the
    step the evaluation's metrics are logged at)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        if not torch.distributed.is_initialized() or self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` across ranks in place (a device tensor: NCCL reduces only GPU tensors)."""
        if torch.distributed.is_initialized() and self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor


class TrainTask:
    """One recipe family's model, data, loss and export, built on every rank from the stage config.

    The engine calls, in order: ``train_dataset()``, ``eval_dataset()``, ``module()``,
    ``param_groups(module)``, then (rank 0, fresh job) ``on_start(tracker)``, then per
    micro-batch ``module.forward(batch, generator)`` where ``batch = collate(items)`` moved to
    the device, per evaluation batch ``eval_step(module, batch)``, and (rank 0) at the end
    ``export(module, folder, tracker)``. ``docs/architecture.md`` walks through a toy task.
    """

    def __init__(self, cfg, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx

    def train_dataset(self) -> Dataset:
        """Map-style training examples (``len`` and ``[i]``). Draw augmentation from the global
        random/numpy/torch RNGs: the engine seeds them per example."""
        raise NotImplementedError

    def eval_dataset(self) -> Dataset | None:
        """The validation split (never test: the best checkpoint is chosen on it); None: no evaluation."""
        return None

    def collate(self, items: list[Any]) -> Any:
        """Examples -> one batch (dicts, lists and tuples of tensors are moved to the device)."""
        return default_collate(items)

    def module(self) -> torch.nn.Module:
        """The nn.Module DeepSpeed wraps. ``forward(batch, generator)`` returns the scalar loss, or
        (loss, {name: scalar}) whose metrics are averaged across ranks and logged as train/<name>.
        All randomness comes from ``generator`` (or the global torch RNG, seeded per micro-batch)."""
        raise NotImplementedError

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        """Optimizer groups; a group may carry its own ``lr``. Default: every trainable parameter."""
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]

    def eval_step(self, module: torch.nn.Module, batch: Any) -> dict[str, Any]:
        """Metrics of one evaluation batch (no grad, module in eval mode): ``name: (sum, count)`` is
        averaged (sum of sums / sum of counts over every batch of every rank); ``name: value`` is
        summed. Name them by split, e.g. ``val/dice``."""
        raise NotImplementedError(f"{type(self).__name__} has an eval_dataset but no eval_step")

    def on_start(self, tracker: Tracker) -> None:
        """Log what the model will see (rank 0, once per job)."""

    def export(self, module: torch.nn.Module, folder: Path, tracker: Tracker) -> dict[str, Any]:
        """Write the job's model into ``folder`` (rank 0); returns its lineage (the engine writes it
        to ``folder/lineage.json``, MLflow and summary.json, and adds ``config.yaml``)."""
        raise NotImplementedError


# -- data order ---------------------------------------------------------------------------------
