"""A toy training task: the engine's task contract in a few lines (docs/architecture.md).

Two Gaussian blobs in 8 dimensions, a small MLP, cross-entropy, accuracy on a validation
split. ``record`` (tests only) writes, per rank, the example indices of every micro-batch
and, at every evaluation, rank 0's weights: the test compares runs with them.

Run a job with it: ``python toy_task.py OUT [key=value ...]`` (see ``main``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from sonosynth.trainers.config import TrainStageConfig
from sonosynth.trainers.task import TrainTask
from sonosynth.trainers.tasks import register_task


class Blobs(torch.utils.data.Dataset):
    """``n`` points of two classes; training items get a little noise (augmentation)."""

    def __init__(self, n: int, seed: int, augment: bool):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 8, generator=g) + (self.y[:, None] * 2 - 1) * 0.6
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        noise = 0.3 * torch.randn(8) if self.augment else 0  # the global RNG: the engine seeds it per example
        return {"x": self.x[i] + noise, "y": self.y[i], "index": i}


class ToyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        self.record = None

    def forward(self, batch: dict, generator: torch.Generator):
        if self.training and self.record:
            self.record(batch["index"])
        logits = self.net(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        return loss, {"acc": (logits.argmax(1) == batch["y"]).float().mean()}


class ToyConfig(TrainStageConfig):
    task: ClassVar[str] = "toy"
    experiment: ClassVar[str] = "sonosynth-toy"

    examples: int = 64
    """Training examples."""
    val_examples: int = 50
    """Validation examples (the best checkpoint is chosen on them)."""
    record: str | None = None
    """Tests: a local folder for the batches each rank saw and the weights at every evaluation."""
    step_sleep_s: float = 0.0
    """Tests: seconds each micro-batch sleeps, so that a test can kill a job mid-run."""


@register_task("toy")
class ToyTask(TrainTask):
    def train_dataset(self):
        return Blobs(self.cfg.examples, seed=1, augment=True)

    def eval_dataset(self):
        return Blobs(self.cfg.val_examples, seed=2, augment=False)

    def module(self):
        torch.manual_seed(self.cfg.engine.seed)  # the same initial weights on every rank
        net = ToyNet()
        if self.cfg.record:
            net.record = self._record_batch
        return net

    def eval_step(self, module, batch):
        logits = module.net(batch["x"])
        if self.cfg.record and self.ctx.is_main:
            torch.save(module.state_dict(), Path(self.cfg.record) / f"eval-{self.ctx.step}.pt")
        return {"val/acc": ((logits.argmax(1) == batch["y"]).sum(), len(batch["y"])),
                "val/loss": (F.cross_entropy(logits, batch["y"], reduction="sum"), len(batch["y"]))}

    def export(self, module, folder, tracker):
        torch.save(module.state_dict(), folder / "weights.pt")
        return {"examples": self.cfg.examples, "val_examples": self.cfg.val_examples}

    def _record_batch(self, indices: torch.Tensor) -> None:
        with open(Path(self.cfg.record) / f"batches-rank{self.ctx.rank}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": self.ctx.step, "indices": indices.tolist()}) + "\n")
        time.sleep(self.cfg.step_sleep_s)


def main(argv: list[str]) -> None:
    """``OUT [key=value ...]``: train the toy task into OUT on a local Ray; prints summary.json."""
    from sonosynth.infra.config import apply_overrides, build
    from sonosynth.trainers.launcher import train

    cfg = build(ToyConfig, apply_overrides({"out": argv[0]}, argv[1:]))
    if cfg.record:
        Path(cfg.record).mkdir(parents=True, exist_ok=True)
    print(json.dumps(train(cfg)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
