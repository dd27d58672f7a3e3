"""The task contract: what a recipe family (LoRA, SAM, classifier) gives the training engine.

``TrainTask`` is built on every rank as ``TrainTask(cfg, ctx)``; ``WorkerContext`` is the
rank's view of the job (rank, world, device, output storage, the current step);
``encode_once`` is how a task caches what a frozen encoder makes of its examples in memory
(``embedding_store`` keeps them on each node's disk instead).
docs/architecture.md has the contract on one page with a toy task as the example.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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

    def node_ranks(self) -> list[int]:
        """The ranks on this rank's machine (grouped by hostname), lowest first: the first is the
        node's leader. Every rank must call it together."""
        hosts = self.all_gather(socket.gethostname())
        if len(hosts) != self.world:  # not distributed
            return [self.rank]
        return [r for r, host in enumerate(hosts) if host == hosts[self.rank]]

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
    the device, per evaluation batch ``eval_step(module, batch)`` and, once the figures of every
    rank are combined, ``finalize_metrics(reduced)``, and (rank 0) at the end
    ``export(module, folder, tracker)``; ``data_skipped()`` once the datasets are built and once the
    steps are done. ``docs/architecture.md`` walks through a toy task.
    """

    def __init__(self, cfg, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx

    def train_dataset(self) -> Dataset:
        """Map-style training examples (``len`` and ``[i]``). Draw augmentation from the global
        random/numpy/torch RNGs: the engine seeds them per example."""
        raise NotImplementedError

    def eval_dataset(self) -> Dataset | None:
        """The validation split (never test: the best checkpoint is chosen on it); None or empty: no
        evaluation (the engine refuses that while ``engine.best_metric`` needs one)."""
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

    def finalize_metrics(self, reduced: dict[str, float]) -> dict[str, float]:
        """The evaluation's metrics from ``reduced``, ``eval_step``'s figures over the whole split
        (the same on every rank): compute here what needs every rank's counts first, e.g. a macro
        F1 from summed per-class counts. What it returns is logged and is what
        ``engine.best_metric`` chooses from. Default: ``reduced`` as it is."""
        return reduced

    def on_start(self, tracker: Tracker) -> None:
        """Log what the model will see (rank 0, once per job)."""

    def data_skipped(self) -> dict[str, int]:
        """{reason: count} of the samples this rank's readers left out so far under the data's
        ``reader.on_error: skip`` (the readers' ``skipped``). The engine adds up every rank's and logs
        them as ``data/skipped/<reason>`` and in summary.json's ``skipped``. Default: nothing skipped."""
        return {}

    def export(self, module: torch.nn.Module, folder: Path, tracker: Tracker) -> dict[str, Any]:
        """Write the job's model into ``folder`` (rank 0); returns its lineage (the engine writes it
        to ``folder/lineage.json``, MLflow and summary.json, and adds ``config.yaml``)."""
        raise NotImplementedError


@torch.no_grad()
def encode_once(ctx: WorkerContext, n: int, load: Callable[[int], torch.Tensor],
                encode: Callable[[torch.Tensor], Any], chunk: int = 8, dtype: torch.dtype = torch.float32) -> Any:
    """What a frozen encoder makes of examples ``0..n-1``, each encoded once in the whole job: this
    rank encodes every world-th example (``encode`` of up to ``chunk`` stacked ``load(i)``, on the
    rank's device), then the shares are gathered, so every rank gets all ``n`` on the CPU (in
    ``dtype``, in example order). ``encode`` returns a tensor or a tuple of tensors with one row per example;
    the result has the same form, each stacked over the ``n`` examples."""
    if n < 1:
        raise ValueError("encode_once needs at least one example")
    mine = list(range(ctx.rank, n, ctx.world))
    encoded: dict[int, Any] = {}
    for start in range(0, len(mine), chunk):
        part = mine[start:start + chunk]
        out = encode(torch.stack([load(i) for i in part]).to(ctx.device))
        for row, i in enumerate(part):
            encoded[i] = (tuple(t[row].to(dtype).cpu() for t in out) if isinstance(out, tuple)
                          else out[row].to(dtype).cpu())
    gathered: dict[int, Any] = {}
    for share in ctx.all_gather(encoded):
        gathered.update(share)
    rows = [gathered[i] for i in range(n)]
    if isinstance(rows[0], tuple):
        return tuple(torch.stack(column) for column in zip(*rows))
    return torch.stack(rows)
