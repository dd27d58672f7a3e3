"""The sampler actor: one per GPU (or CPU slot), model loaded once, a shard per call.

Two calls may be in flight per actor (``max_concurrency=2``): while one holds the device
lock and denoises, the other encodes PNGs, writes its tar and uploads it, so I/O overlaps
sampling. A call is idempotent: a shard whose completion record already matches its plan
is returned as is, and a re-run shard is the same samples under the same name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from sonosynth.datasets.manifest import manifest_row
from sonosynth.datasets.records import Sample, synthetic_key
from sonosynth.datasets.shards import ShardRecord, done_key, find_completed, publish_shard, shard_key
from sonosynth.datasets.synthetic import extract
from sonosynth.infra.storage import open_storage
from sonosynth.launch.generate.config import GenerateConfig, JobPlan

ATTEMPTS_EXHAUSTED = "attempts_exhausted"


def shard_name(run_id: str) -> str:
    return f"syn-{run_id}"


def materialize_lora(files: dict[str, bytes] | None, sha256: str | None) -> Path | None:
    """The LoRA the driver fetched and hashed, written once per node into a folder named by
    its hash (reused by every actor and later job on that node, never downloaded again)."""
    if not files:
        return None
    folder = Path(tempfile.gettempdir()) / "sonosynth-lora" / sha256
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=folder.parent))
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        try:
            tmp.rename(folder)
        except OSError:  # another actor on this node won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


class SamplerWorker:
    """A Ray actor (``ray.remote(SamplerWorker)``): loads the model in ``__init__``, samples one
    shard per ``run_shard`` call."""

    def __init__(self, cfg: dict[str, Any], plan: dict[str, Any], lora_files: dict[str, bytes] | None = None,
                 lora_sha256: str | None = None):
        import torch

        from sonosynth.trainers.diffusion.sampler import Sampler

        self.cfg = GenerateConfig.model_validate(cfg)
        self.plan = JobPlan(**plan)
        if not torch.cuda.is_available():
            torch.set_num_threads(self.cfg.cpus_per_worker)
        self.sampler = Sampler(self.cfg.sampler, lora_dir=materialize_lora(lora_files, lora_sha256),
                               lora_sha256=lora_sha256)
        self.storage = open_storage(self.cfg.out, self.cfg.storage)
        self.device_lock = threading.Lock()
        self.lineage = {"base_model": self.cfg.sampler.model.identity(), **self.sampler.lora_identity(),
                        "scheduler": self.cfg.sampler.scheduler, "steps": self.cfg.sampler.steps,
                        "guidance": self.cfg.sampler.guidance, "resolution": self.sampler.resolution,
                        "generation_run": self.plan.run_id, "mode": self.plan.mode}

    def pid(self) -> int:
        return os.getpid()

    def run_shard(self, task: dict[str, Any]) -> dict[str, Any]:
        key = shard_key(shard_name(self.plan.run_id), task["shard_index"])
        done = find_completed(self.storage, done_key(key), task["plan"])
        if done is not None:
            return {"shard_index": task["shard_index"], "record": done.__dict__, "images": 0,
                    "sampling_s": 0.0, "reused": True}
        started = time.time()
        t0 = time.perf_counter()
        with self.device_lock:
            accepted, rejected, images = self._sample(task["indices"])
        sampling_s = time.perf_counter() - t0
        samples = [accepted[i] for i in sorted(accepted)]
        record = ShardRecord(shard=None, plan=task["plan"], rejected=rejected)
        if samples:
            record.sha256, _ = publish_shard(self.storage, key, samples)
            record.shard, record.num_samples = key, len(samples)
            record.rows = [manifest_row(s, key) for s in samples]
        record.save(self.storage, done_key(key))
        return {"shard_index": task["shard_index"], "record": record.__dict__, "images": images,
                "sampling_s": sampling_s, "reused": False, "started": started, "finished": time.time()}

    def _sample(self, indices: list[int]) -> tuple[dict[int, Sample], list[dict[str, Any]], int]:
        cfg, plan = self.cfg, self.plan
        pending = deque((i, 0) for i in indices)
        accepted: dict[int, Sample] = {}
        rejected: list[dict[str, Any]] = []
        images = 0
        while pending:
            batch = [plan.spec(cfg, *pending.popleft()) for _ in range(min(cfg.sampler.batch_size, len(pending)))]
            for spec, rgb in zip(batch, self.sampler(batch)):
                images += 1
                ex = extract(rgb, plan.mode, cfg.qc)
                if ex.reason and cfg.qc.enforce:
                    rejected.append({"index": spec.index, "attempt": spec.attempt, "seed": spec.seed,
                                     "reason": ex.reason, "detail": ex.detail, **ex.qc})
                    if spec.attempt + 1 < cfg.max_attempts:
                        pending.append((spec.index, spec.attempt + 1))
                    else:
                        rejected.append({"index": spec.index, "reason": ATTEMPTS_EXHAUSTED,
                                         "detail": f"{cfg.max_attempts} attempts failed QC"})
                    continue
                accepted[spec.index] = self._sample_record(spec, ex)
        return accepted, rejected, images

    def _sample_record(self, spec, ex) -> Sample:
        h, w = ex.image.shape
        meta = {
            "cohort": "synthetic", "source": "synthetic", "source_id": str(spec.index), "patient_id": None,
            "plane": spec.plane, "split": "train", "pixel_size_mm": None, "width": w, "height": h,
            "has_mask": ex.mask is not None, **self.lineage, "prompt": spec.prompt, "seed": spec.seed,
            "attempt": spec.attempt, "index": spec.index, "qc_reason": ex.reason, **ex.qc,
        }
        return Sample(synthetic_key(self.plan.run_id, spec.index), ex.image, ex.mask, meta)
