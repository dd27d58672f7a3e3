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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sonosynth.datasets.manifest import manifest_row
from sonosynth.datasets.records import Sample, decode_png, synthetic_key
from sonosynth.datasets.shape_model import (HeadShape, MaskAugmentConfig, ShapeModel, augment_mask, normalize,
                                            render, square_mask)
from sonosynth.datasets.shards import ShardRecord, done_key, find_completed, publish_shard, shard_key
from sonosynth.datasets.synthetic import Extracted, extract, extract_mask_mode
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.storage import open_storage
from sonosynth.launch.generate.config import GenerateConfig, JobPlan, mask_seed

ATTEMPTS_EXHAUSTED = "attempts_exhausted"


def shard_name(run_id: str) -> str:
    return f"syn-{run_id}"


def materialize_lora(files: dict[str, bytes] | None, sha256: str | None) -> Path | None:
    """The LoRA the driver fetched and hashed, written once per node into a folder named by
    its hash (reused by every actor and later job on that node, never downloaded again)."""
    return materialize_folder(files, sha256, "lora")


def materialize_folder(files: dict[str, bytes] | None, sha256: str | None, kind: str) -> Path | None:
    """A model folder the driver fetched and hashed (a LoRA, ControlNet or segmenter), written once
    per node under ``sonosynth-<kind>/<sha256>``."""
    if not files:
        return None
    folder = Path(tempfile.gettempdir()) / f"sonosynth-{kind}" / sha256
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


class ConditioningMasks:
    """Mask mode: ``draw(i, a)`` is sample ``i``'s conditioning mask at attempt ``a`` (uint8 0/255,
    ``resolution`` square) and where it came from; a function of (seed, i, a) alone.

    Shape model: a head drawn with the generator seeded by ``mask_seed(seed, i, a)``, rendered.
    Real masks: attempt 0 takes the masks in a seeded order (each used as evenly as the count
    allows), later attempts a seeded random one; squared like the trainers square theirs and
    augmented with the same seed."""

    def __init__(self, source: dict[str, Any], files: dict[str, bytes] | None, resolution: int, seed: int):
        self.kind, self.resolution, self.seed = source["source"], resolution, seed
        if self.kind == "shape_model":
            self.model = ShapeModel.from_dict(source["model"])
        else:
            self.keys, self.files, self.frame = list(source["keys"]), files or {}, source["frame"]
            self.augment = MaskAugmentConfig(**source["augment"])
            self.order = np.random.default_rng(derive_seed("generate-mask-order", seed)).permutation(len(self.keys))
            missing = [k for k in self.keys if k not in self.files]
            if missing:
                raise ValueError(f"the mask files of {len(missing)} keys (e.g. {missing[0]}) did not reach the actor")

    def draw(self, index: int, attempt: int) -> tuple[np.ndarray, dict[str, Any]]:
        seed, r = mask_seed(self.seed, index, attempt), self.resolution
        if self.kind == "shape_model":
            shape = self.model.sample(np.random.default_rng(seed), 1)[0]
            return render(shape, r, r), {"mask_seed": seed, "mask_shape": shape.to_dict()}
        pick = self.order[index % len(self.keys)] if attempt == 0 else \
            int(np.random.default_rng(seed).integers(len(self.keys)))
        key = self.keys[pick]
        mask = augment_mask(square_mask(decode_png(self.files[key]), r, self.frame), self.augment, seed)
        shape = fitted_shape(mask)
        return mask, {"mask_seed": seed, "mask_source_key": key, "mask_shape": shape.to_dict() if shape else None}


def fitted_shape(mask: np.ndarray) -> HeadShape | None:
    """The head ellipse of a square mask in its unit square (None when no ellipse fits)."""
    from sonosynth.trainers.evaluation.segmentation import fit_head

    e = fit_head(mask > 0) if mask.any() else None
    return None if e is None else normalize(e, *mask.shape, "stretch")


class LabelFidelity:
    """Mask mode QC: ``fidelity(image, mask)`` is the Dice of a SAM's mask, prompted with the tight box
    of the conditioning mask, against that mask (the SAM loaded once, on the actor's device)."""

    def __init__(self, folder: Path):
        import torch

        from sonosynth.trainers.sam.models import load_sam_model

        self.sam = load_sam_model(str(folder), device="cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> float:
        from sonosynth.datasets.augment import box_from_mask
        from sonosynth.trainers.evaluation.segmentation import dice_iou
        from sonosynth.trainers.sam.models import predict_masks

        box = box_from_mask(mask, jitter_px=0)
        if box is None:
            return 0.0
        return dice_iou(predict_masks(self.sam, image, box[None])[0], mask > 0)[0]


class SamplerWorker:
    """A Ray actor (``ray.remote(SamplerWorker)``): loads the model in ``__init__``, samples one
    shard per ``run_shard`` call. ``mask_mode``: {controlnet, masks, segmenter: files} from the
    driver (their hashes are in the plan)."""

    masks: ConditioningMasks | None = None
    """Mask mode: the conditioning masks (None in joint and class mode)."""
    fidelity: LabelFidelity | None = None
    """Mask mode with qc.segmenter: the label-fidelity scorer."""

    def __init__(self, cfg: dict[str, Any], plan: dict[str, Any], lora_files: dict[str, bytes] | None = None,
                 lora_sha256: str | None = None, mask_mode: dict[str, Any] | None = None):
        import torch

        from sonosynth.trainers.diffusion.sampler import Sampler

        self.cfg = GenerateConfig.model_validate(cfg)
        self.plan = JobPlan(**plan)
        if not torch.cuda.is_available():
            torch.set_num_threads(self.cfg.cpus_per_worker)
        files, plan = mask_mode or {}, self.plan
        cn_sha = (plan.controlnet or {}).get("sha256")
        self.sampler = Sampler(self.cfg.sampler, lora_dir=materialize_lora(lora_files, lora_sha256),
                               lora_sha256=lora_sha256,
                               controlnet_dir=materialize_folder(files.get("controlnet"), cn_sha, "controlnet"),
                               controlnet_sha256=cn_sha)
        if plan.mode == "mask":
            self.masks = ConditioningMasks(plan.masks, files.get("masks"), self.sampler.resolution, self.cfg.seed)
            if plan.segmenter_sha256:
                self.fidelity = LabelFidelity(materialize_folder(files.get("segmenter"), plan.segmenter_sha256,
                                                                 "segmenter"))
        self.storage = open_storage(self.cfg.out, self.cfg.storage)
        self.device_lock = threading.Lock()
        self.lineage = {"base_model": self.cfg.sampler.model.identity(), **self.sampler.lora_identity(),
                        "scheduler": self.cfg.sampler.scheduler, "steps": self.cfg.sampler.steps,
                        "guidance": self.cfg.sampler.guidance, "resolution": self.sampler.resolution,
                        "generation_run": self.plan.run_id, "mode": self.plan.mode}
        if plan.mode == "mask":
            self.lineage.update(self.sampler.controlnet_identity(), mask_source=plan.masks["lineage"],
                                segmenter_sha256=plan.segmenter_sha256)

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
        cfg = self.cfg
        pending = deque((i, 0) for i in indices)
        accepted: dict[int, Sample] = {}
        rejected: list[dict[str, Any]] = []
        images = 0
        while pending:
            batch = [self._spec(*pending.popleft()) for _ in range(min(cfg.sampler.batch_size, len(pending)))]
            for spec, rgb in zip(batch, self.sampler(batch)):
                images += 1
                ex = self._check(spec, rgb)
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

    def _spec(self, index: int, attempt: int):
        spec = self.plan.spec(self.cfg, index, attempt)
        if self.masks is None:
            return spec
        mask, info = self.masks.draw(index, attempt)
        return replace(spec, mask=mask, mask_info=info)

    def _check(self, spec, rgb: np.ndarray) -> Extracted:
        if self.masks is None:
            return extract(rgb, self.plan.mode, self.cfg.qc)
        shape = spec.mask_info.get("mask_shape")
        return extract_mask_mode(rgb, spec.mask, self.cfg.qc, self.fidelity,
                                 HeadShape(**shape).ellipse(*spec.mask.shape) if shape else None)

    def _sample_record(self, spec, ex) -> Sample:
        h, w = ex.image.shape
        meta = {
            "cohort": "synthetic", "source": "synthetic", "source_id": str(spec.index), "patient_id": None,
            "plane": spec.plane, "split": "train", "pixel_size_mm": None, "width": w, "height": h,
            "has_mask": ex.mask is not None, **self.lineage, "prompt": spec.prompt, "seed": spec.seed,
            "attempt": spec.attempt, "index": spec.index, "qc_reason": ex.reason, **ex.qc, **spec.mask_info,
        }
        return Sample(synthetic_key(self.plan.run_id, spec.index), ex.image, ex.mask, meta)
