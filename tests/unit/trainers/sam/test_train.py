"""train-sam's task in-process (one rank, no Ray): data, cache, loss, config rules, export and loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from sonosynth.datasets.augment import PairedAugment, boxes_to_input, full_box, tight_box
from sonosynth.datasets.ingest import IngestConfig, run_ingest
from sonosynth.datasets.mix import mix_lineage
from sonosynth.infra.config import ConfigError, build
from sonosynth.infra.storage import open_storage
from sonosynth.trainers.batching import SeededExamples
from sonosynth.trainers.engine import task_datasets
from sonosynth.trainers.sam.data import sam_example
from sonosynth.trainers.sam.models import WEIGHTS_FILE, embed, load_sam_model, predict_masks, sam_forward
from sonosynth.trainers.sam.train import SamTask, SamTrainConfig
from sonosynth.trainers.task import WorkerContext


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops on a busy 2-core machine are many times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ingest(out: Path, num: int, seed: int = 0, val: float = 0.25) -> str:
    cfg = build(IngestConfig, {"out": str(out), "splits": {"val": val, "test": 0.1}, "cohort": {
        "name": "phantom", "phantom": {"num": num, "height": 96, "width": 80, "planes": ["brain"], "seed": seed}}})
    run_ingest(cfg, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("sam-train")
    return _ingest(root / "real", 24), _ingest(root / "syn", 16, seed=5, val=0.0)


def _cfg(tmp: Path, real: str, **extra) -> SamTrainConfig:
    data = {"sources": {"real": {"dataset": real}}, "image_size": 64, **extra.pop("data", {})}
    cache = {"dir": str(tmp / "embeddings"), **extra.pop("embedding_cache", {})}
    return build(SamTrainConfig, {"out": str(tmp / "out"), "data": data, "model": {"arch": "tiny"},
                                  "engine": {"max_steps": 4, "micro_batch": 3}, "embedding_cache": cache, **extra})


def _task(cfg: SamTrainConfig) -> SamTask:
    return SamTask(cfg, WorkerContext(0, 1, 0, torch.device("cpu"), open_storage(cfg.out)))


def _batch(dataset, step: int, n: int = 3) -> dict:
    """Examples loaded as the engine loads them: global RNGs seeded per (step, example)."""
    seeded = SeededExamples(dataset)
    return default_collate([seeded[(i % len(dataset), 1000 * step + i)] for i in range(n)])


def test_cached_and_uncached_embeddings_give_the_same_loss_on_the_same_step(data, tmp_path):
    cached = _task(_cfg(tmp_path, data[0], embedding_cache={"dtype": "float32"}))  # float16 rounds the loss
    uncached = _task(_cfg(tmp_path, data[0], cache_embeddings=False))
    assert cached.cfg.cache_train and not uncached.cfg.cache_train
    a, b = cached.module(), uncached.module()
    assert a.image_encoder is None and b.image_encoder is not None
    opt_a = torch.optim.Adam([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.Adam([p for p in b.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ba, bb = _batch(cached.train_dataset(), step), _batch(uncached.train_dataset(), step)
        assert "embedding" in ba and "image" not in ba and "image" in bb and "embedding" not in bb
        torch.testing.assert_close(ba["box"], bb["box"], rtol=0, atol=0)  # the same jitter draws
        torch.testing.assert_close(ba["target"], bb["target"], rtol=0, atol=0)
        (la, ma), (lb, mb) = a(ba), b(bb)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ma["dice"], mb["dice"])
        for opt, loss in ((opt_a, la), (opt_b, lb)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, pa), pb in zip(a.mask_decoder.named_parameters(), b.mask_decoder.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)
    # the validation set is cached in both (never augmented, encoder frozen) unless turned off
    assert cached.eval_dataset().embeddings is not None and uncached.eval_dataset().embeddings is None


def test_the_disk_store_gives_the_in_memory_examples_and_the_next_job_reuses_it(data, tmp_path):
    stored, held = _task(_cfg(tmp_path, data[0])), _task(_cfg(tmp_path, data[0], embedding_cache={"in_memory": True}))
    for a, b in ((stored.train_dataset(), held.train_dataset()), (stored.eval_dataset(), held.eval_dataset())):
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            np.random.seed(i)
            x = a[i]
            np.random.seed(i)
            y = b[i]
            assert x.keys() == y.keys() == {"box", "target", "embedding"}
            for name in x:
                torch.testing.assert_close(x[name], y[name], rtol=0, atol=0, msg=name)  # the same float16 rows
    n = len(stored.train_dataset()) + len(stored.eval_dataset())
    assert stored.cache_lineage()["train"]["encoded_images"] == len(stored.train_dataset())
    again = _task(_cfg(tmp_path, data[0], out=str(tmp_path / "other-job")))
    assert again.cache_lineage()["train"]["store"] == stored.cache_lineage()["train"]["store"]
    assert again.export(again.module(), tmp_path, None)["cache_reused_images"] == n
    finer = _task(_cfg(tmp_path, data[0], data={"image_size": 48}))  # other preprocessing: another store
    assert finer.cache_lineage()["train"]["store"] != stored.cache_lineage()["train"]["store"]


def test_an_image_is_identified_by_its_dataset_key_and_bytes(tmp_path):
    import shutil

    from sonosynth.datasets.mix import Manifests, Taken, open_mix
    from sonosynth.trainers.sam.data import image_identities

    def identities(height: int) -> tuple[list[str], list[str]]:
        shutil.rmtree(tmp_path / "ds", ignore_errors=True)
        cfg = build(IngestConfig, {"out": str(tmp_path / "ds"), "splits": {"val": 0.0, "test": 0.0}, "cohort": {
            "name": "phantom", "phantom": {"num": 3, "height": height, "width": 80, "planes": ["brain"]}}})
        run_ingest(cfg, progress=False)
        keys = sorted(r["key"] for r in Manifests().rows(str(tmp_path / "ds")))
        mix = open_mix([Taken("real", str(tmp_path / "ds"), None, 3, keys)])
        return mix.keys(), image_identities(mix)

    keys, ids = identities(96)
    again_keys, again = identities(64)  # ingested again under the same keys, other pixels
    assert keys == again_keys and len(set(ids)) == 3 and not set(ids) & set(again)
    assert all(i.startswith(f"{tmp_path / 'ds'}\n{k}\nsha256:") for i, k in zip(ids, keys))


def test_an_example_is_sam_example_of_the_resized_pair_with_the_engine_seeded_draw(data, tmp_path):
    task = _task(_cfg(tmp_path, data[0], data={"augment": {"preset": "strong"}}))
    ds = task.train_dataset()
    assert ds.embeddings is None  # augmentation: the encoder runs every step
    key, image, mask = ds.raw(2)
    assert image.shape == (64, 53) and image.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.random.seed(7)
    got = ds[2]
    np.random.seed(7)
    epoch = int(np.random.randint(2**31))
    want = sam_example(image, mask, augment=PairedAugment("strong", task.cfg.engine.seed), model_size=64,
                       low_res=task.low_res, jitter_px=19, seed=task.cfg.engine.seed, epoch=epoch, key=key)
    for name in ("image", "box", "target"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    # another engine seed, another draw; validation examples always get the same box
    np.random.seed(8)
    assert not torch.equal(ds[2]["box"], got["box"])
    val = task.eval_dataset()
    assert torch.equal(val[0]["box"], val[0]["box"])


@pytest.mark.parametrize("preset", ["weak", "strong"])
def test_the_box_is_drawn_from_the_augmented_mask(data, tmp_path, preset):
    ds = _task(_cfg(tmp_path, data[0], data={"augment": {"preset": preset, "box_jitter_px": 0}})).train_dataset()
    moved = 0
    for i in range(len(ds)):
        np.random.seed(i)
        ex = ds[i]
        ys, xs = np.nonzero(ex["target"][0].numpy() > 0)
        if not len(xs):
            continue
        scale = ex["target"].shape[-1] / 64  # input frame -> low-res frame
        x0, y0, x1, y1 = (ex["box"].numpy() * scale).tolist()
        assert x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() <= y1 + 1, i
        _, _, mask = ds.raw(i)
        moved += not np.array_equal(ex["target"].numpy(), task_target(ds, mask))
    assert moved, "augmentation never moved a mask"


def task_target(ds, mask) -> np.ndarray:
    from sonosynth.datasets.augment import logit_target

    return logit_target(mask, ds.model_size, ds.low_res).numpy()


def _l_shape(h: int = 96, w: int = 128) -> np.ndarray:
    """An asymmetric L: flips and rotations all move it somewhere else."""
    m = np.zeros((h, w), np.uint8)
    m[15:70, 20:38] = 1
    m[55:70, 20:75] = 1
    return m


def test_sam_example_boxes_come_from_the_augmented_mask():
    mask = _l_shape()
    image = np.where(mask > 0, 200, 30).astype(np.uint8)
    aug = PairedAugment("strong", seed=0)
    common = dict(augment=aug, model_size=64, low_res=32, jitter_px=0, seed=0, epoch=0)
    ex = sam_example(image, mask, key="k4", **common)
    _, m = aug(image, mask, index="k4")
    assert ex["image"].shape == (3, 64, 64) and ex["target"].shape == (1, 32, 32)
    assert torch.allclose(ex["box"], torch.from_numpy(boxes_to_input(tight_box(m)[None], mask.shape, 64)[0]))
    assert "image" not in sam_example(image, mask, key="k4", with_image=False, **common)
    empty = sam_example(image, np.zeros_like(mask), key="k4", **common)  # the whole image, an all-zero target
    assert empty["target"].sum() == 0
    assert torch.allclose(empty["box"], torch.from_numpy(boxes_to_input(full_box(mask.shape)[None], mask.shape, 64)[0]))


def test_sources_mix_by_count_or_fraction_with_a_seeded_nested_choice(data, tmp_path):
    from sonosynth.trainers.sam.data import plan_sam_data

    real, syn = data
    sources = {"real": {"dataset": real, "count": 5}, "synthetic": {"dataset": syn, "fraction": 0.5, "split": None}}
    a = _task(_cfg(tmp_path, real, data={"sources": sources}))
    lineage = mix_lineage(a.train_parts)
    assert lineage["real"]["examples"] == 5 and lineage["synthetic"]["examples"] == 8
    assert len(a.train_dataset()) == 13 and lineage["synthetic"]["available"] == 16
    assert a.train_source.keys() == a.train_parts[0].keys + a.train_parts[1].keys  # the mix reads what was taken
    b = _task(_cfg(tmp_path, real, data={"sources": sources}))
    c = _task(_cfg(tmp_path, real, data={"sources": sources, "seed": 1}))
    assert a.train_source.keys() == b.train_source.keys() != c.train_source.keys()
    # paper A's grid of N: for one seed, fewer real images are a subset of more
    taken = [set(plan_sam_data(_cfg(tmp_path, real, data={"sources": {"real": {"dataset": real, "count": n}}}).data)
                 [0][0].keys) for n in (2, 5, 9)]
    assert taken[0] < taken[1] < taken[2] and set(a.train_parts[0].keys) == taken[1]
    # count 0 leaves a source out without opening it; val is the real dataset's val split
    d = _task(_cfg(tmp_path, real, data={"sources": {**sources, "synthetic": {"dataset": "nowhere", "count": 0}}}))
    assert [p.name for p in d.train_parts] == ["real"] and (d.val_part.dataset, d.val_part.split) == (real, "val")
    with pytest.raises(ConfigError, match=r"data.sources.real: .* samples with a mask in split 'train' and the "
                                          r"mix asks for 999 of them; lower its count"):
        _task(_cfg(tmp_path, real, data={"sources": {"real": {"dataset": real, "count": 999}}}))


def test_config_rules_name_the_fix(data, tmp_path):
    real = data[0]
    with pytest.raises(ConfigError, match="must not be test"):
        _cfg(tmp_path, real, data={"val": {"split": "test"}})
    with pytest.raises(ConfigError, match="data.sources.real takes the test split .* would leak"):
        _cfg(tmp_path, real, data={"sources": {"real": {"dataset": real, "split": "test"}}})
    with pytest.raises(ConfigError, match="split=train"):
        _cfg(tmp_path, real, data={"sources": {"real": {"dataset": real, "split": None}}})
    with pytest.raises(ConfigError, match="cannot be embedded once"):
        _cfg(tmp_path, real, cache_embeddings=True, data={"augment": {"preset": "weak"}})
    with pytest.raises(ConfigError, match="frozen image encoder"):
        _cfg(tmp_path, real, cache_embeddings=True, mode="lora")
    with pytest.raises(ConfigError, match="count or fraction"):
        _cfg(tmp_path, real, data={"sources": {"real": {"dataset": real, "count": 2, "fraction": 0.5}}})
    # the SAM defaults fill what an engine section leaves out; an explicit null stays
    cfg = build(SamTrainConfig, {"out": "x", "data": {"sources": {"real": {"dataset": real}}},
                                 "engine": {"workers": 1}})
    assert (cfg.engine.best_metric, cfg.engine.epochs) == ("val/dice", 20)
    assert build(SamTrainConfig, cfg.to_dict()).to_dict() == cfg.to_dict()
    cfg = build(SamTrainConfig, {"out": "x", "data": {"sources": {"real": {"dataset": real}}},
                                 "engine": {"max_steps": 3, "best_metric": None}})
    assert cfg.engine.best_metric is None and cfg.engine.epochs is None
    assert build(SamTrainConfig, {"out": "x", "data": {"sources": {"r": {"dataset": real}}}}).engine.micro_batch == 5
    assert (cfg.engine.micro_batch, cfg.engine.max_steps) == (5, 3)  # any engine section keeps SAM's micro-batch
    own = build(SamTrainConfig, {"out": "x", "data": {"sources": {"real": {"dataset": real}}},
                                 "engine": {"max_steps": 3, "micro_batch": 2}})
    assert own.engine.micro_batch == 2 and own.engine.best_metric == "val/dice"  # the recipe's own value wins
    assert "data.cache_dir" not in cfg.job_identity() and "data.sources.real.count" in cfg.job_identity()


def test_an_empty_validation_split_is_refused_while_best_metric_needs_it(data, tmp_path):
    syn = data[1]  # no val split
    task = _task(_cfg(tmp_path, data[0], data={"val": {"dataset": syn}}))
    with pytest.raises(ConfigError, match="best_metric=null"):
        task_datasets(task.cfg, task)
    quiet = _task(_cfg(tmp_path, data[0], data={"val": {"dataset": syn}},
                       engine={"max_steps": 2, "best_metric": None}))
    assert task_datasets(quiet.cfg, quiet)[1] is None


def _train_and_export(cfg: SamTrainConfig, folder: Path) -> tuple[SamTask, torch.nn.Module]:
    task = _task(cfg)
    module = task.module()
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss, _ = module(_batch(task.train_dataset(), step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder.mkdir(parents=True)
    lineage = task.export(module, folder, None)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "lineage.json").write_text(json.dumps(lineage))
    return task, module.eval()


@pytest.mark.parametrize("mode", ["decoder", "lora", "full"])
def test_exported_model_loads_back_and_predicts_like_the_trained_one(data, tmp_path, mode):
    cfg = _cfg(tmp_path, data[0], mode=mode, lora={"rank": 4})
    task, module = _train_and_export(cfg, tmp_path / "model")
    payload = torch.load(tmp_path / "model" / WEIGHTS_FILE, weights_only=True)
    parts = {k.split(".")[0] for k in payload["state_dict"]}
    assert parts == ({"image_encoder", "prompt_encoder", "mask_decoder"} if mode == "full"
                     else {"prompt_encoder", "mask_decoder"})
    if mode == "lora":
        assert payload["lora"] and all(k.endswith("attn.qkv") for k in payload["lora"])
    sam = load_sam_model(str(tmp_path / "model"))
    assert sam.sonosynth_work_size == 64 and sam.sonosynth_lineage["mode"] == mode
    batch = default_collate([task.eval_dataset()[i] for i in range(3)])
    with torch.no_grad():
        want = module.logits(batch)
        # lora and full: the loaded encoder is the trained one (the LoRA merged into its weights)
        emb = batch["embedding"] if "embedding" in batch else embed(sam, batch["image"])
        got = sam_forward(sam, None, batch["box"], image_embeddings=emb)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a full-size image: resized to the training size, predicted, brought back
    _, image, mask = task.eval_dataset().raw(0)
    big = np.kron(image, np.ones((3, 3), np.uint8))
    masks = predict_masks(sam, big, np.array([[10, 10, 120, 150], [0, 0, 158, 191]], np.float32))
    assert masks.shape == (2, 192, 159) and masks.dtype == bool


def test_a_decoder_model_needs_its_base_weights(data, tmp_path):
    base = tmp_path / "base.pth"
    from sonosynth.trainers.sam.models import SamModelConfig, build_sam

    torch.save(build_sam(SamModelConfig(arch="tiny", seed=3)).state_dict(), base)
    cfg = _cfg(tmp_path, data[0], model={"arch": "tiny", "checkpoint": str(base)})
    _train_and_export(cfg, tmp_path / "model")
    lineage = json.loads((tmp_path / "model" / "lineage.json").read_text())
    assert lineage["base_checkpoint_sha256"]
    assert lineage["sources"]["real"]["examples"] == len(_task(cfg).train_dataset())
    moved = tmp_path / "elsewhere.pth"
    base.rename(moved)
    with pytest.raises(ConfigError, match="base_checkpoint="):
        load_sam_model(str(tmp_path / "model"))
    assert load_sam_model(str(tmp_path / "model"), base_checkpoint=str(moved)) is not None
    torch.save(build_sam(SamModelConfig(arch="tiny", seed=4)).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not the base"):
        load_sam_model(str(tmp_path / "model"), base_checkpoint=str(tmp_path / "other.pth"))


def test_model_folders_come_from_s3_and_bad_uris_say_what_to_point_at(data, tmp_path, s3_bucket):
    from sonosynth.infra.model_registry import fetch_model_folder

    _train_and_export(_cfg(tmp_path, data[0]), tmp_path / "model")
    store = open_storage(f"s3://{s3_bucket}/sam/model")
    for path in (tmp_path / "model").iterdir():
        store.put_file(path.name, path)
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("sonosynth-model-*"))
    sam = load_sam_model(f"s3://{s3_bucket}/sam/model")
    assert set(Path(tempfile.gettempdir()).glob("sonosynth-model-*")) == before, "the downloaded copy stays behind"
    local = load_sam_model(str(tmp_path / "model"))
    assert (tmp_path / "model" / WEIGHTS_FILE).is_file()  # a local folder is left alone
    assert all(torch.equal(v, local.state_dict()[k]) for k, v in sam.state_dict().items())
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_sam_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="holds no sam_finetuned.pt"):
        fetch_model_folder(str(tmp_path), required=WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match="cannot fetch"):
        fetch_model_folder("models:/sonosynth-sam/1", f"sqlite:///{tmp_path / 'empty.db'}")


@pytest.mark.parametrize("mode", ["decoder", "full"])
def test_a_bf16_engine_trains_the_same_module(data, tmp_path, mode):
    """DeepSpeed's bf16 casts the whole module; segment_anything's positional encoding is float32."""
    task = _task(_cfg(tmp_path, data[0], mode=mode))
    batch = _batch(task.train_dataset(), 0)
    ref, _ = task.module()(batch)
    module = task.module().to(torch.bfloat16)  # (the task's SAM itself: modules share its parts)
    loss, metrics = module(batch)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.02
    grads = [p.grad for p in module.mask_decoder.parameters() if p.grad is not None]  # (the IoU head gets none)
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        out = task.eval_step(module, default_collate([task.eval_dataset()[i] for i in range(2)]))
    assert out["val/dice"][1] == 2


def test_every_sam_recipe_resolves_and_the_sweep_builds_every_cell():
    from sonosynth.launch.recipes import find_recipe, load_recipe, packaged_recipes, resolve
    from sonosynth.launch.sweep.cells import cell_config
    from sonosynth.launch.sweep.config import SweepConfig

    names = sorted(p.stem for p in packaged_recipes().glob("sam_*.yaml"))
    assert {"sam_tiny", "sam_paper_a", "sam_paper_a_sweep"} <= set(names)
    for name in names:
        if name.endswith("_sweep"):
            continue
        cfg = resolve(SamTrainConfig, name, {}, [])
        assert cfg.engine.best_metric == "val/dice" and cfg.data.augment.box_jitter_px == 19
    paper = resolve(SamTrainConfig, "sam_paper_a", {"data": {"sources": {"real": {"dataset": "d"}}}}, [])
    assert (paper.model.arch, paper.mode, paper.optim.lr, paper.optim.weight_decay, paper.engine.epochs,
            paper.engine.micro_batch, paper.engine.workers, paper.data.image_size) == \
        ("vit_b", "decoder", 1e-5, 0.0, 20, 5, 1, 256)
    assert paper.cache_train and not resolve(SamTrainConfig, "sam_paper_a_weak", {}, []).cache_train
    assert resolve(SamTrainConfig, "sam_paper_a_synthetic", {}, []).data.sources["synthetic"].count == 495
    sweep = build(SweepConfig, load_recipe(find_recipe("sam_paper_a_sweep")))
    cells = sweep.cells()
    assert len(cells) == 7 * 4
    built = [cell_config(sweep, cell, SamTrainConfig) for cell in cells]
    assert len({c.out for c in built}) == len(cells)
    assert {c.data.sources["real"].count for c in built} == {5, 10, 20, 50, 100, 300, 500}
