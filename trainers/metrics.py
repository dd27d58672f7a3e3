"""What the engine measures: training metrics averaged across ranks, evaluations combined across
ranks, and which evaluation is the best.

- ``TrainMeter``: the loss and the metrics ``forward`` returns, summed on the device between
  log steps; one all_reduce averages them over micro-batches and ranks.
- ``evaluate``: every rank runs ``eval_step`` over its share of the validation set; the sums
  and counts of every rank are gathered (one collective per evaluation) and combined in rank
  order, the same on every rank, then the task's ``finalize_metrics`` computes what needs the
  whole split (e.g. a macro F1 from summed per-class counts).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, TypedDict

import torch

from sonosynth.trainers.batching import to_device
from sonosynth.trainers.task import TrainTask, WorkerContext


class Best(TypedDict):
    """The best evaluation by ``engine.best_metric`` (what summary.json and checkpoints record)."""

    metric: str
    mode: str
    value: float
    step: int
    metrics: dict[str, float]


def split_output(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """``forward``'s result as (loss, metrics)."""
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Mapping):
        return out[0], dict(out[1])
    raise TypeError(f"forward(batch, generator) must return the loss or (loss, {{name: value}}), "
                    f"not {type(out).__name__}")


def _scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A number or one-element tensor as a float64 scalar on ``device`` (no host sync)."""
    return torch.as_tensor(value).detach().to(device, torch.float64).reshape(())


class TrainMeter:
    """Loss and metrics summed on the device between log steps; one all_reduce averages them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, loss: torch.Tensor, metrics: dict[str, Any]) -> None:
        names = sorted(metrics)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"forward returned metrics {names} after {self.names}; return the same names "
                             f"on every micro-batch and rank")
        row = torch.stack([_scalar(loss, self.device)] + [_scalar(metrics[k], self.device) for k in names])
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def reduce(self, ctx: WorkerContext) -> dict[str, float]:
        """Averages over micro-batches and ranks: {"train/loss": ..., "train/<name>": ...}; then reset."""
        if self.sums is None:
            return {}
        totals = ctx.all_reduce(self.sums.clone()).tolist()
        n = self.count * ctx.world
        out = {"train/loss": totals[0] / n}
        for name, total in zip(self.names or [], totals[1:]):
            out[name if "/" in name else f"train/{name}"] = total / n
        self.sums, self.count = None, 0
        return out


@torch.no_grad()
def evaluate(task: TrainTask, module: torch.nn.Module, loader: Iterable, ctx: WorkerContext,
             non_blocking: bool = False) -> dict[str, float]:
    """The task's metrics over the whole validation set, the same on every rank: each rank runs
    ``eval_step`` over its share, the shares are combined, ``task.finalize_metrics`` finishes."""
    was_training = module.training
    module.eval()
    sums: dict[str, list] = {}  # name -> [sum, count or None] on the device
    try:
        for batch in loader:
            for name, value in task.eval_step(module, to_device(batch, ctx.device, non_blocking)).items():
                total, count = value if isinstance(value, (tuple, list)) else (value, None)
                total = _scalar(total, ctx.device)
                count = None if count is None else _scalar(count, ctx.device)
                if name not in sums:
                    sums[name] = [total, count]
                else:
                    sums[name][0] = sums[name][0] + total
                    if count is not None:
                        sums[name][1] = sums[name][1] + count
    finally:
        module.train(was_training)
    return task.finalize_metrics(combine(ctx.all_gather(_to_host(sums))))


def _to_host(sums: dict[str, list]) -> dict[str, tuple[float, float | None]]:
    """This rank's sums and counts as Python floats (one device sync)."""
    names = sorted(sums)
    if not names:
        return {}
    zero = next(iter(sums.values()))[0].new_zeros(())
    values = torch.stack([torch.stack([total, zero if count is None else count])
                          for total, count in (sums[n] for n in names)]).tolist()
    return {n: (total, None if sums[n][1] is None else count) for n, (total, count) in zip(names, values)}


def combine(shares: list[dict[str, tuple[float, float | None]]]) -> dict[str, float]:
    """Every rank's (sum, count) per name -> sum / count, or the bare sum where no count was given;
    a name whose counts add up to 0 is left out. A rank with an empty share adds nothing."""
    totals: dict[str, list] = {}
    for share in shares:
        for name, (total, count) in share.items():
            acc = totals.setdefault(name, [0.0, None])
            acc[0] += total
            if count is not None:
                acc[1] = (acc[1] or 0.0) + count
    return {name: total if count is None else total / count
            for name, (total, count) in sorted(totals.items()) if count is None or count > 0}


def improves(value: float, best: Best | None, mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best["value"] if mode == "max" else value < best["value"]
