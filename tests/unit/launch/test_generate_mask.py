"""generate in mask mode without a model: config validation, plan identity, the conditioning masks
and the label-fidelity QC, with a stand-in sampler (the real sampler is in the integration test)."""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np
import pytest

from sonosynth.datasets.records import decode_png
from sonosynth.datasets.shape_model import HeadShape, MaskAugmentConfig, ShapeModel, augment_mask, render, square_mask
from sonosynth.datasets.synthetic import EMPTY, LOW_FIDELITY
from sonosynth.infra.config import ConfigError, build
from sonosynth.infra.storage import LocalStorage
from sonosynth.launch.generate.config import GenerateConfig, mask_seed, plan_job, sample_seed
from sonosynth.launch.generate.driver import mask_source
from sonosynth.launch.generate.worker import ATTEMPTS_EXHAUSTED, ConditioningMasks, SamplerWorker

CN = {"sha256": "c" * 64, "lineage": {"kind": "controlnet", "prompt": "a fetal head", "resolution": 64,
                                      "clip_skip": 1, "lora_sha256": None}}


def cfg(tmp_path, **kw) -> GenerateConfig:
    data = {"out": str(tmp_path / "out"), "num_samples": 6, "shard_size": 4, "mode": "mask",
            "sampler": {"controlnet": "cn"}, "masks": {"shape_model": "sm.json"}}
    for key, value in kw.items():
        node, *path = key.split(".")
        target = data
        for part in [node, *path][:-1]:
            target = target.setdefault(part, {})
        target[[node, *path][-1]] = value
    return build(GenerateConfig, data)


@pytest.fixture(scope="module")
def model() -> ShapeModel:
    rng = np.random.default_rng(0)
    masks = [render(HeadShape(*rng.normal(0.5, 0.04, 2), 0.3, 0.2, rng.uniform(0, 3)), 64, 64) for _ in range(12)]
    return ShapeModel.fit(masks)


def shape_source(model: ShapeModel) -> dict:
    return {"source": "shape_model", "identity": {"source": "shape_model", "sha256": model.sha256()},
            "lineage": {"source": "shape_model", "sha256": model.sha256()}, "model": model.to_dict()}


# -- config ----------------------------------------------------------------------------------------

def test_mask_mode_needs_a_controlnet_and_says_which_flag(tmp_path):
    with pytest.raises(ConfigError, match="draws an image for each mask with a ControlNet: pass --controlnet"):
        build(GenerateConfig, {"out": "o", "mode": "mask", "masks": {"dataset": "d"}})
    with pytest.raises(ConfigError, match=r"--controlnet \(sampler.controlnet\) is for mask mode, not joint mode"):
        build(GenerateConfig, {"out": "o", "mode": "joint", "sampler": {"controlnet": "cn"}})
    implied = build(GenerateConfig, {"out": "o", "sampler": {"controlnet": "cn"}, "masks": {"dataset": "d"}})
    assert implied.mask_mode and plan_job(implied, {"mode": "joint"}, None, controlnet=CN,
                                          masks={"identity": {}}).mode == "mask"


def test_joint_and_class_options_are_refused_in_mask_mode(tmp_path):
    with pytest.raises(ConfigError, match=r"qc.threshold, qc.allow_border: joint-mode mask extraction settings"):
        cfg(tmp_path, **{"qc.threshold": 200, "qc.allow_border": True})
    with pytest.raises(ConfigError, match="planes and per_class are for class mode"):
        cfg(tmp_path, planes=["brain"])
    with pytest.raises(ConfigError, match="masks.source=real draws real masks: set masks.dataset"):
        cfg(tmp_path, masks={"source": "real"})
    with pytest.raises(ConfigError, match="needs a model: set masks.shape_model"):
        cfg(tmp_path, masks={})
    with pytest.raises(ConfigError, match="masks.shape_model and masks.dataset are both set"):
        cfg(tmp_path, masks={"shape_model": "a.json", "dataset": "d"})
    with pytest.raises(ConfigError, match=r"min_label_fidelity is a Dice"):
        cfg(tmp_path, **{"qc.min_label_fidelity": 2})
    # ... and the mask-mode options outside it
    with pytest.raises(ConfigError, match=r"masks.\* is for mask mode"):
        build(GenerateConfig, {"out": "o", "masks": {"dataset": "d"}})
    with pytest.raises(ConfigError, match="qc.segmenter is for mask mode"):
        build(GenerateConfig, {"out": "o", "qc": {"segmenter": "models:/sonosynth-sam@champion"}})
    # the resolved config written beside the output builds again
    c = cfg(tmp_path, **{"qc.segmenter": "sam", "qc.min_label_fidelity": 0.8})
    assert build(GenerateConfig, c.to_dict()) == c


# -- plan identity ---------------------------------------------------------------------------------

def test_run_id_follows_the_controlnet_the_masks_and_the_qc(tmp_path, model):
    c, masks = cfg(tmp_path), shape_source(model)
    plan = plan_job(c, {}, None, controlnet=CN, masks=masks)
    assert plan.mode == "mask" and plan.prompts == {"": "a fetal head"} and len(plan.tasks) == 2
    assert plan_job(c, {}, None, controlnet=CN, masks=masks).run_id == plan.run_id
    other_cn = {**CN, "sha256": "d" * 64}
    assert plan_job(c, {}, None, controlnet=other_cn, masks=masks).run_id != plan.run_id
    other_model = ShapeModel.from_dict({**model.to_dict(), "border_margin": 0.05})
    assert plan_job(c, {}, None, controlnet=CN, masks=shape_source(other_model)).run_id != plan.run_id
    real = {"identity": {"source": "real", "masks_sha256": "m" * 64, "augment": MaskAugmentConfig().to_dict()}}
    real_rotated = {"identity": {**real["identity"], "augment": MaskAugmentConfig(rotate_deg=30).to_dict()}}
    ids = {plan_job(c, {}, None, controlnet=CN, masks=m).run_id for m in (real, real_rotated)}
    assert len(ids) == 2 and plan.run_id not in ids
    assert plan_job(c, {}, None, controlnet=CN, masks=masks, segmenter_sha="s" * 64).run_id != plan.run_id
    # where the ControlNet was read from is not what it is: its weights' sha256 is
    moved = cfg(tmp_path, **{"sampler.controlnet": "models:/sonosynth-controlnet@champion"})
    assert plan_job(moved, {}, None, controlnet=CN, masks=masks).run_id == plan.run_id
    assert plan_job(cfg(tmp_path, prompt="another"), {}, None, controlnet=CN, masks=masks).run_id != plan.run_id


def test_joint_run_ids_are_what_they_were_before_mask_mode(tmp_path):
    c = build(GenerateConfig, {"out": str(tmp_path / "x"), "num_samples": 10, "shard_size": 4})
    assert plan_job(c, {"mode": "joint", "prompts": ["head"]}, "abc").run_id == "37d0ff8b9c"


def test_the_controlnet_s_lora_must_be_the_one_given(tmp_path, model):
    trained = {**CN, "lineage": {**CN["lineage"], "lora": "runs/lora/model", "lora_sha256": "a" * 64}}
    with pytest.raises(ValueError, match=r"trained with the LoRA runs/lora/model .* no --lora is given: pass that "
                                         r"LoRA with --lora"):
        plan_job(cfg(tmp_path), {}, None, controlnet=trained, masks=shape_source(model))
    with pytest.raises(ValueError, match="--lora has sha256 bbbbbbbbbbbb"):
        plan_job(cfg(tmp_path), {}, "b" * 64, controlnet=trained, masks=shape_source(model))
    assert plan_job(cfg(tmp_path), {}, "a" * 64, controlnet=trained, masks=shape_source(model)).mode == "mask"


# -- the worker, with a stand-in sampler -----------------------------------------------------------

class StandInSampler:
    """Draws the conditioning mask as the image (so the image matches its mask); records its specs."""

    resolution = 64

    def __init__(self):
        self.specs = []

    def __call__(self, specs):
        self.specs.extend(specs)
        return [np.repeat(s.mask[..., None], 3, axis=2) for s in specs]


def worker(c: GenerateConfig, masks: dict, files=None, fidelity=None, sha=None) -> SamplerWorker:
    w = SamplerWorker.__new__(SamplerWorker)
    w.cfg, w.plan = c, plan_job(c, {}, None, controlnet=CN, masks=masks, segmenter_sha=sha)
    w.sampler, w.masks = StandInSampler(), ConditioningMasks(masks, files, 64, c.seed)
    w.fidelity, w.storage, w.device_lock = fidelity, LocalStorage(c.out), threading.Lock()
    w.lineage = {"generation_run": w.plan.run_id, "mask_source": masks["lineage"]}
    return w


def test_each_sample_keeps_its_conditioning_mask_whatever_the_batch(tmp_path, model):
    masks = shape_source(model)
    w = worker(cfg(tmp_path, **{"sampler.batch_size": 4}), masks)
    accepted, rejected, images = w._sample([0, 1, 2, 3, 4, 5])
    assert rejected == [] and images == 6
    for i, s in accepted.items():
        want = render(model.sample(np.random.default_rng(mask_seed(0, i, 0)), 1)[0], 64, 64)
        assert s.mask is not None and s.mask.dtype == np.uint8 and (s.mask == want).all()
        assert s.meta["mask_seed"] == mask_seed(0, i, 0) and s.meta["seed"] == sample_seed(0, i, 0)
        assert s.meta["mask_shape"] == model.sample(np.random.default_rng(mask_seed(0, i, 0)), 1)[0].to_dict()
        assert s.meta["qc_area_frac"] == pytest.approx((want > 0).mean()) and "qc_label_fidelity" not in s.meta
        assert s.meta["qc_ellipse_a"] == pytest.approx(64 * s.meta["mask_shape"]["a"])
        json.dumps(s.meta)  # meta.json
    # another worker, other batches, another order: the same masks
    again = worker(cfg(tmp_path, **{"sampler.batch_size": 1}), masks)._sample([5, 3])[0]
    assert all((again[i].mask == accepted[i].mask).all() for i in (3, 5))
    assert len({accepted[i].mask.tobytes() for i in accepted}) == 6


def test_label_fidelity_rejects_and_redraws_with_the_next_attempt(tmp_path, model):
    calls = []

    def fidelity(image, mask):  # low on attempt 0, high afterwards
        calls.append(mask)
        return 0.2 if len(calls) <= 3 else 0.9

    c = cfg(tmp_path, **{"sampler.batch_size": 3, "qc.segmenter": "sam", "qc.min_label_fidelity": 0.5})
    w = worker(c, shape_source(model), fidelity=fidelity, sha="s" * 64)
    accepted, rejected, images = w._sample([0, 1, 2])
    assert images == 6 and [r["reason"] for r in rejected] == [LOW_FIDELITY] * 3
    assert all(r["qc_label_fidelity"] == 0.2 and r["attempt"] == 0 for r in rejected)
    for i, s in accepted.items():
        assert s.meta["attempt"] == 1 and s.meta["qc_label_fidelity"] == 0.9
        assert s.meta["mask_seed"] == mask_seed(0, i, 1)  # a new attempt draws a new mask too
        assert (s.mask == render(model.sample(np.random.default_rng(mask_seed(0, i, 1)), 1)[0], 64, 64)).all()
    few = worker(cfg(tmp_path, max_attempts=1, **{"qc.segmenter": "sam"}), shape_source(model),
                 fidelity=lambda image, mask: 0.0, sha="s" * 64)
    accepted, rejected, _ = few._sample([0])
    assert accepted == {} and [r["reason"] for r in rejected] == [LOW_FIDELITY, ATTEMPTS_EXHAUSTED]


def test_an_empty_conditioning_mask_is_redrawn(tmp_path, model):
    empty = ShapeModel.from_dict({**model.to_dict(), "bounds": {**model.bounds, "log_a": [-9, -9], "log_b": [-9, -9]}})
    accepted, rejected, _ = worker(cfg(tmp_path, max_attempts=2), shape_source(empty))._sample([0])
    assert accepted == {} and [r["reason"] for r in rejected] == [EMPTY, EMPTY, ATTEMPTS_EXHAUSTED]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, make_phantom_dataset) -> str:
    return str(make_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", 5, ["brain"], size=48))


def test_the_shape_model_is_fitted_on_the_dataset_or_read_from_a_file_or_job(tmp_path, phantom, model):
    from sonosynth.infra.stage import InputNotFound
    from sonosynth.launch.generate.driver import load_shape_model

    source, files, fitted = mask_source(cfg(tmp_path, masks={"dataset": phantom, "split": None}), "stretch")
    assert files is None and fitted is not None and fitted.n_masks == 5 and fitted.frame == "stretch"
    assert source["identity"] == {"source": "shape_model", "sha256": fitted.sha256()}
    assert source["lineage"]["fitted_on"]["dataset"] == phantom and source["model"] == fitted.to_dict()
    (tmp_path / "job").mkdir()
    model.save(tmp_path / "job" / "shape_model.json")
    for where in (tmp_path / "job", tmp_path / "job" / "shape_model.json"):
        source, _, fitted = mask_source(cfg(tmp_path, masks={"shape_model": str(where)}), "pad")
        assert fitted is None and source["identity"]["sha256"] == model.sha256()
    with pytest.raises(InputNotFound, match="masks.shape_model .*nope.json does not exist; point it at a shape_model"):
        load_shape_model(str(tmp_path / "nope.json"), cfg(tmp_path))


def test_real_masks_are_squared_augmented_and_used_evenly(tmp_path, phantom):
    data = phantom
    c = cfg(tmp_path, masks={"source": "real", "dataset": str(data), "split": None})
    source, files, fitted = mask_source(c, "pad")
    assert fitted is None and len(files) == 5 and source["keys"] == sorted(files)
    assert source["identity"]["masks_sha256"] == source["lineage"]["masks_sha256"]
    draws = ConditioningMasks(source, files, 64, c.seed)
    firsts = [draws.draw(i, 0)[1]["mask_source_key"] for i in range(10)]
    assert Counter(firsts) == {k: 2 for k in files}  # attempt 0 goes through the masks in a seeded order
    mask, info = draws.draw(3, 1)
    want = augment_mask(square_mask(decode_png(files[info["mask_source_key"]]), 64, "pad"), MaskAugmentConfig(),
                        mask_seed(0, 3, 1))
    assert (mask == want).all() and info["mask_shape"] is not None
    assert (ConditioningMasks(source, files, 64, c.seed).draw(3, 1)[0] == mask).all()
    accepted, _, _ = worker(c, source, files)._sample([0, 1])
    assert accepted[1].meta["mask_source_key"] == firsts[1] and accepted[1].meta["mask_source"]["source"] == "real"


def test_the_segmenter_scores_the_image_against_its_mask(tmp_path):
    import torch
    import yaml

    from sonosynth.launch.generate.worker import LabelFidelity
    from sonosynth.trainers.sam.models import FORMAT, WEIGHTS_FILE, SamModelConfig, build_sam

    folder = tmp_path / "sam"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "tiny", "seed": 0}}))
    torch.save({"format": FORMAT, "mode": "full", "state_dict": build_sam(SamModelConfig()).state_dict()},
               folder / WEIGHTS_FILE)
    fidelity = LabelFidelity(folder)
    mask = render(HeadShape(0.5, 0.5, 0.3, 0.2, 0.4), 64, 64)
    dice = fidelity(mask, mask)
    assert 0.0 <= dice <= 1.0 and fidelity(mask, mask) == dice
    assert fidelity(mask, np.zeros_like(mask)) == 0.0
