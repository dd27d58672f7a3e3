"""train-classifier without Ray: the config, the data plan (mix by count and ratio, label map,
validation), and the task's pieces on one in-process rank (forward, eval sums, export, load)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.classifier.sources import ClassifierDataConfig, plan_data
from sonosynth.trainers.classifier.train import ClassifierTask, ClassifierTrainConfig, class_weights, f1_by_class

PLANES = ["abdomen", "brain", "femur", "thorax"]


def ingest_phantom(dest: Path, num: int, planes: list[str], *, val: float = 0.1, test: float = 0.1,
                   seed: int = 0) -> str:
    from sonosynth.datasets.ingest import IngestConfig, run_ingest

    cfg = build(IngestConfig, {"out": str(dest), "splits": {"val": val, "test": test}, "cohort": {
        "name": "phantom", "phantom": {"num": num, "height": 48, "width": 64, "planes": planes, "seed": seed}}})
    assert run_ingest(cfg, progress=False).ingested == num
    return str(dest)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("classifier-data")
    return {"planes": ingest_phantom(root / "planes", 96, PLANES),
            "no_val": ingest_phantom(root / "no-val", 48, PLANES, val=0.0, test=0.0, seed=1),
            "two": ingest_phantom(root / "two", 40, ["brain", "femur"], seed=2)}


def data_cfg(**kw) -> ClassifierDataConfig:
    return build(ClassifierDataConfig, kw)


# -- config -------------------------------------------------------------------------------------------

def real(dataset: str, **kw) -> dict:
    return {"sources": {"real": {"dataset": dataset}}, **kw}


def test_named_sources_and_what_dataset_sets():
    from sonosynth.launch.recipes import resolve

    recipe = {"sources": {"real": {"dataset": "runs/fpdb", "count": 1150, "class_balanced": True},
                          "synthetic": {"dataset": "runs/syn", "split": None, "count": 5000}}}
    cfg = data_cfg(**recipe)
    assert list(cfg.sources) == ["real", "synthetic"] and cfg.sources["real"].count == 1150
    # --dataset merges into sources.real.dataset, keeping the recipe's count
    from sonosynth.infra.config import merge

    merged = data_cfg(**merge(recipe, {"sources": {"real": {"dataset": "runs/other"}}}))
    assert merged.sources["real"].dataset == "runs/other" and merged.sources["real"].count == 1150
    assert list(data_cfg(**merge(recipe, {"sources": {"synthetic": {"count": 0}}})).used_sources()) == ["real"]
    assert build(ClassifierDataConfig, cfg.to_dict()) == cfg  # the resolved config.yaml builds the same config
    tiny = resolve(ClassifierTrainConfig, "classifier_tiny", {"out": "o", "data": {"sources": {"real": {
        "dataset": "runs/x"}}}}, [])
    assert list(tiny.data.sources) == ["real"] and tiny.data.sources["real"].dataset == "runs/x"
    with pytest.raises(ConfigError, match="no training data: pass --dataset"):
        data_cfg()
    with pytest.raises(ConfigError, match="no training data"):
        data_cfg(sources={"real": {"dataset": "a", "count": 0}})
    with pytest.raises(ConfigError, match="count, fraction or ratio, not two"):
        data_cfg(sources={"a": {"dataset": "a", "count": 3, "ratio": 0.5}})
    with pytest.raises(ConfigError, match="at least one source needs no ratio"):
        data_cfg(sources={"a": {"dataset": "a", "ratio": 0.5}})
    with pytest.raises(ConfigError, match="holdout must be in"):
        data_cfg(**real("a", validation={"holdout": 1.5}))
    with pytest.raises(ConfigError, match=r"data.sources.real takes the test split of a: .*leak it into the scores; "
                                          r"set data.sources.real.split=train"):
        data_cfg(sources={"real": {"dataset": "a", "split": "test"}})
    with pytest.raises(ConfigError, match="must not be test"):
        data_cfg(**real("a", validation={"split": "test"}))


def test_stage_config_names_its_task_model_and_defaults():
    cfg = build(ClassifierTrainConfig, {"out": "runs/c", "data": real("runs/a")})
    assert (cfg.task, cfg.stage_name(), cfg.experiment, cfg.registered_model) == (
        "classifier", "train-classifier", "sonosynth-train-classifier", "sonosynth-classifier")
    assert cfg.engine.epochs == 20 and cfg.engine.best_metric == "val/acc" and cfg.model.image_size == 224
    assert cfg.augment.preset == "paper"
    partial = build(ClassifierTrainConfig, {"out": "runs/c", "data": real("runs/a"), "engine": {"workers": 4}})
    assert (partial.engine.workers, partial.engine.epochs, partial.engine.micro_batch, partial.engine.best_metric) == (
        4, 20, 12, "val/acc")  # a recipe's engine section keeps the classifier's defaults it leaves out
    steps = build(ClassifierTrainConfig, {"out": "runs/c", "data": real("runs/a"),
                                          "engine": {"max_steps": 50, "best_metric": None}})
    assert (steps.engine.max_steps, steps.engine.epochs, steps.engine.best_metric) == (50, None, None)
    moved = build(ClassifierTrainConfig, {"out": "runs/c", "data": real("runs/a", cache_dir="/tmp/x")})
    assert moved.job_identity() == cfg.job_identity()  # the shard cache may move on a resume
    other = build(ClassifierTrainConfig, {"out": "runs/c", "data": real("runs/b")})
    assert other.job_identity() != cfg.job_identity()


# -- the data plan ------------------------------------------------------------------------------------

def test_plan_takes_the_train_split_and_validates_on_val(data):
    plan = plan_data(data_cfg(**real(data["planes"])))
    assert list(plan.labels.classes) == PLANES
    (train,), (val,) = plan.train, plan.val
    assert set(train.keys).isdisjoint(val.keys) and val.name == "validation (val split)"
    from sonosynth.datasets.indexed import ShardDataset

    assert train.keys == ShardDataset(data["planes"], split="train").keys()
    assert val.keys == ShardDataset(data["planes"], split="val").keys()
    assert len(plan.train_labels()) == len(train.keys) and plan.lineage()["labels"] == PLANES
    record = plan.lineage()["sources"]["real"]
    assert record["examples"] == len(train.keys) and sum(record["per_class"].values()) == len(train.keys)


def test_counts_are_exact_seeded_and_class_balanced(data):
    cfg = data_cfg(sources={"real": {"dataset": data["planes"], "count": 20, "class_balanced": True}})
    plan = plan_data(cfg)
    assert plan.train[0].counts() == {p: 5 for p in PLANES}
    assert plan_data(cfg).train[0].keys == plan.train[0].keys
    other_seed = plan_data(data_cfg(sources={"real": {"dataset": data["planes"], "count": 20,
                                                      "class_balanced": True}}, seed=1))
    assert other_seed.train[0].keys != plan.train[0].keys
    plain = plan_data(data_cfg(sources={"real": {"dataset": data["planes"], "count": 13}})).train[0]
    assert len(plain.keys) == 13
    more = plan_data(data_cfg(sources={"real": {"dataset": data["planes"], "count": 30}})).train[0]
    assert set(plain.keys) < set(more.keys)  # nested: the mix's one choice
    fewer = plan_data(data_cfg(sources={"real": {"dataset": data["planes"], "count": 12, "class_balanced": True}}))
    assert set(fewer.train[0].keys) < set(plan.train[0].keys)  # class-balanced too
    half = plan_data(data_cfg(sources={"real": {"dataset": data["planes"], "fraction": 0.5}})).train[0]
    assert len(half.keys) == round(0.5 * half.available)
    rarest = plan_data(data_cfg(sources={"real": {"dataset": data["planes"],
                                                  "class_balanced": True}})).train[0].counts()
    assert len(set(rarest.values())) == 1  # as many of each class as the rarest has
    with pytest.raises(ConfigError, match="asks for 500"):
        plan_data(data_cfg(sources={"real": {"dataset": data["planes"], "count": 500}}))


def test_ratio_is_a_share_of_the_mix(data):
    plan = plan_data(data_cfg(sources={"real": {"dataset": data["planes"], "count": 30},
                                       "more": {"dataset": data["two"], "ratio": 0.25}}))
    assert [len(p.keys) for p in plan.train] == [30, 10]  # 10 / (30 + 10) = 0.25


def test_one_label_map_survives_missing_classes_and_leaves_others_out(data):
    plan = plan_data(data_cfg(sources={"real": {"dataset": data["planes"]}, "two": {"dataset": data["two"]}}))
    assert list(plan.labels.classes) == PLANES  # the union of the manifests
    assert plan.train[1].counts().keys() == {"brain", "femur"}
    second = plan.train_labels()[len(plan.train[0].keys):]
    assert set(second) == {PLANES.index("brain"), PLANES.index("femur")}  # indices of the job's map
    only = plan_data(data_cfg(**real(data["planes"], labels=["femur", "brain", "thorax"])))
    assert list(only.labels.classes) == ["brain", "femur", "thorax"]
    abdomen = plan.train[0].counts()["abdomen"] + plan.val[0].counts()["abdomen"]
    assert only.left_out == {"plane abdomen not in the label map": abdomen}
    assert "abdomen" not in only.train[0].counts() and "abdomen" not in only.val[0].counts()
    excluded = plan_data(data_cfg(**real(data["planes"], exclude_labels=["thorax"])))
    assert list(excluded.labels.classes) == ["abdomen", "brain", "femur"]
    wider = plan_data(data_cfg(**real(data["two"], labels=["abdomen", "brain", "femur"])))
    assert wider.missing_train_classes == ["abdomen"] and len(wider.labels) == 3


def test_a_dataset_without_val_split_is_an_error_naming_the_fixes_or_a_patient_holdout(data):
    with pytest.raises(ConfigError, match=r"no 'val' split.*splits.val=0.1.*validation.holdout.*validation.datasets"):
        plan_data(data_cfg(**real(data["no_val"])))
    plan = plan_data(data_cfg(**real(data["no_val"], validation={"holdout": 0.25})))
    (train,), (val,) = plan.train, plan.val
    assert val.keys and set(train.keys).isdisjoint(val.keys) and len(train.keys) + len(val.keys) == 48
    from sonosynth.datasets.manifest import read_manifest
    from sonosynth.infra.storage import open_storage

    rows = read_manifest(open_storage(data["no_val"])).to_pylist()
    patient = {r["key"]: r["patient_id"] for r in rows}
    assert {patient[k] for k in train.keys}.isdisjoint({patient[k] for k in val.keys})  # patient-disjoint
    assert plan_data(data_cfg(**real(data["no_val"], validation={"holdout": 0.25}))).val[0].keys == val.keys
    other = plan_data(data_cfg(**real(data["no_val"], validation={"datasets": [data["planes"]]})))
    assert other.val[0].dataset == data["planes"] and len(other.train[0].keys) == 48


def test_unreadable_dataset_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="sonosynth ingest"):
        plan_data(data_cfg(**real(str(tmp_path / "nothing"))))


# -- the task on one rank -----------------------------------------------------------------------------

def test_class_weights_are_inverse_frequency():
    w = class_weights([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0, 0.0]))


def test_f1_comes_from_the_summed_counts_and_its_macro_mean_from_the_classes_present():
    counts = {"val/counts/a/tp": 3.0, "val/counts/a/fp": 1.0, "val/counts/a/fn": 1.0,
              "val/counts/b/tp": 0.0, "val/counts/b/fp": 0.0, "val/counts/b/fn": 2.0,
              "val/counts/c/tp": 0.0, "val/counts/c/fp": 1.0, "val/counts/c/fn": 0.0}  # c: predicted, never true
    got = f1_by_class(counts, ["a", "b", "c", "d"])
    assert got == {"val/f1/a": 0.75, "val/recall/a": 0.75, "val/f1/b": 0.0, "val/recall/b": 0.0, "val/f1/c": 0.0,
                   "val/f1_macro": 0.375}
    from sonosynth.trainers.evaluation.classification import classification_metrics

    y, pred = np.array([0, 0, 0, 0, 1, 1]), np.array([0, 0, 0, 2, 0, 2])  # as evaluate and promotion score them
    reduced = {f"val/counts/{name}/{k}": float(v) for c, name in enumerate("abcd") for k, v in (
        ("tp", ((pred == c) & (y == c)).sum()), ("fp", ((pred == c) & (y != c)).sum()),
        ("fn", ((pred != c) & (y == c)).sum()))}
    figures = classification_metrics(y, np.eye(4)[pred], list("abcd")).figures
    assert f1_by_class(reduced, list("abcd"))["val/f1_macro"] == pytest.approx(figures["f1_macro"])


@pytest.fixture(scope="module")
def task(data, tmp_path_factory) -> ClassifierTask:
    from sonosynth.infra.storage import open_storage
    from sonosynth.trainers.task import WorkerContext

    out = tmp_path_factory.mktemp("task-out")
    cfg = build(ClassifierTrainConfig, {
        "out": str(out), "data": real(data["planes"]), "model": {"backbone": "tiny_resnet", "image_size": 32},
        "augment": {"max_side": 64}, "loss": {"class_weights": True, "label_smoothing": 0.1},
        "engine": {"max_steps": 2, "micro_batch": 4}})
    return ClassifierTask(cfg, WorkerContext(0, 1, 0, torch.device("cpu"), open_storage(str(out))))


def batch_of(dataset, indices) -> dict:
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def test_items_are_seeded_by_the_engine_and_normalised_with_data_stats(task):
    from sonosynth.trainers.batching import seed_everything

    ds = task.train_dataset()
    seed_everything(5)
    a = ds[3]
    seed_everything(5)
    b = ds[3]
    seed_everything(6)
    c = ds[3]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and not torch.equal(a["pixel_values"], c["pixel_values"])
    assert a["pixel_values"].shape == (3, 32, 32) and a["label"] == task.train_labels[3]
    mean, std = task.stats
    assert 0 < mean < 1 and 0 < std < 1 and task.net.pixel_mean == (mean,) * 3
    ev = task.eval_dataset()
    assert torch.equal(ev[0]["pixel_values"], ev[0]["pixel_values"])  # no augmentation


def test_forward_and_eval_sums(task):
    module = task.module()
    loss, metrics = module(batch_of(task.train_dataset(), range(8)), torch.Generator())
    assert loss.ndim == 0 and loss.requires_grad and 0 <= float(metrics["acc"]) <= 1
    assert module.class_weights is not None and module.class_weights.shape == (4,)
    module.eval()
    ev = task.eval_dataset()
    batch = batch_of(ev, range(len(ev)))
    with torch.no_grad():
        out = task.eval_step(module, batch)
        pred = module.net(batch["pixel_values"]).argmax(1)
    y = batch["label"]
    correct, n = out["val/acc"]
    assert int(correct) == int((pred == y).sum()) and n == len(y)
    for c, name in enumerate(PLANES):
        tp = int(((pred == c) & (y == c)).sum())
        assert int(out[f"val/counts/{name}/tp"]) == tp
        assert int(out[f"val/counts/{name}/fp"]) == int(((pred == c) & (y != c)).sum())
        assert int(out[f"val/counts/{name}/fn"]) == int((y == c).sum()) - tp
    from sonosynth.trainers.evaluation.classification import classification_metrics

    reduced = {k: float(v[0]) / v[1] if isinstance(v, tuple) else float(v) for k, v in out.items()}
    final = task.finalize_metrics(reduced)
    assert not any(k.startswith("val/counts/") for k in final) and final["val/acc"] == reduced["val/acc"]
    probs = torch.softmax(module.net(batch["pixel_values"]), 1).detach().numpy()
    assert final["val/f1_macro"] == pytest.approx(classification_metrics(y.tolist(), probs, PLANES).figures["f1_macro"])


def test_export_loads_back_and_predicts_the_same(task, tmp_path):
    from sonosynth.infra.tracking import Tracker, TrackingConfig
    from sonosynth.trainers.classifier import load_classifier

    module = task.module()
    module.eval()
    tracker = Tracker(TrackingConfig(enabled=False))
    task.on_start(tracker)
    lineage = task.export(module, tmp_path, tracker)
    info = json.loads((tmp_path / "classifier.json").read_text())
    assert info["labels"] == PLANES and info["backbone"] == "tiny_resnet" and info["image_size"] == 32
    assert lineage["data"]["labels"] == PLANES and lineage["data"]["train_samples"] == len(task.train_dataset())
    clf = load_classifier(tmp_path)
    ev = task.eval_dataset()
    images = [ev.image(i) for i in range(4)]
    with torch.no_grad():
        expected = torch.softmax(module.net(torch.stack([ev[i]["pixel_values"] for i in range(4)])), 1).numpy()
    np.testing.assert_allclose(clf.predict_proba(images), expected, atol=1e-5)
    assert clf.predict(images) == [PLANES[i] for i in expected.argmax(1)]
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no classifier.json"):
        load_classifier(tmp_path / "empty")
    assert Counter(clf.labels) == Counter(PLANES)


# -- recipes --------------------------------------------------------------------------------------------

def test_classifier_recipes_resolve_and_the_sweep_matches_the_paper_rows():
    from sonosynth.launch.recipes import packaged_recipes, resolve
    from sonosynth.launch.sweep.cells import cell_config
    from sonosynth.launch.sweep.config import RunSpec, SweepConfig

    names = sorted(p.stem for p in packaged_recipes().glob("classifier_*.yaml") if p.stem != "classifier_paper_sweep")
    assert {"classifier_tiny", "classifier_es", "classifier_es_da", "classifier_hb", "classifier_hb_da"} <= set(names)
    cfgs = {n: resolve(ClassifierTrainConfig, n, {}, []) for n in names}
    rows = {("ES", "none"): "classifier_es", ("ES", "DA"): "classifier_es_da", ("HB", "none"): "classifier_hb",
            ("HB", "DA"): "classifier_hb_da"}
    hb = cfgs["classifier_hb"].data.sources
    assert (hb["real"].count, hb["real"].class_balanced, hb["synthetic"].count) == (1150, True, 5000)
    assert cfgs["classifier_es"].augment.preset == "none" and cfgs["classifier_hb_da"].augment.preset == "paper"
    assert all(cfgs[n].model.image_size == 224 and cfgs[n].engine.best_metric == "val/acc" for n in rows.values())
    assert cfgs["classifier_es"].engine.global_batch() == 24 and cfgs["classifier_es"].data.labels == [
        "abdomen", "brain", "femur", "other", "thorax"]

    sweep = resolve(SweepConfig, "classifier_paper_sweep", {}, [])
    cells = sweep.cells()
    assert len(cells) == 20 and {c["backbone"] for c in cells} == {
        "resnet18", "mobilenet_v2", "efficientnet_b0", "densenet169", "vit_b16"}
    for cell in cells:
        cfg = cell_config(sweep, cell, ClassifierTrainConfig)
        row = cfgs[rows[(cell["data"], cell["augment"])]]
        assert cfg.augment == row.augment and cfg.model.backbone == cell["backbone"]
        assert {k: (s.count, s.class_balanced, s.split) for k, s in cfg.data.sources.items()} == {
            k: (s.count, s.class_balanced, s.split) for k, s in row.data.sources.items()}
        assert cfg.data.labels == row.data.labels and cfg.engine.epochs == row.engine.epochs
        assert cfg.data.sources["real"].dataset.startswith("s3://") and cfg.engine.device == "gpu"
    assert len(sweep.runs()) == 60 and sweep.baseline == {"data": "ES"}  # 3 seeds, HB paired with ES
    seeded = cell_config(sweep, RunSpec(cells[0], 2), ClassifierTrainConfig)
    assert (seeded.data.seed, seeded.engine.seed) == (2, 2) and seeded.out.endswith("__seed-2")
