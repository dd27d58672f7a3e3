"""The embedding store: one file per node built by the node's ranks (each encoding its share),
reused per example by later jobs, keyed by encoder, preprocessing and dtype, never read half-built."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.embedding_store import INDEX_SUFFIX, EmbeddingCacheConfig, cached_embeddings
from sonosynth.trainers.task import WorkerContext

SHAPE = (4, 3, 3)
KEY = {"encoder": "toy", "weights": "sha256:0", "image_size": 64, "preprocess": 1}
N = 6


def _load(i: int) -> torch.Tensor:
    return torch.tensor([i + 0.123, i / 3.0])


def _encode(x: torch.Tensor) -> torch.Tensor:
    """[B, 2] -> [B, 4, 3, 3], different in every element."""
    return x[:, :1, None, None] * torch.arange(36.0).reshape(SHAPE) / 7 + x[:, 1:, None, None]


def _expected(n: int) -> torch.Tensor:
    return _encode(torch.stack([_load(i) for i in range(n)]))


def _ids(n: int) -> list[str]:
    return [f"/data/ds\nkey-{i}\nsha256:{i}" for i in range(n)]


def _build(ctx: WorkerContext, root: Path, n: int = N, key: dict = KEY, encode=_encode, **cache):
    """cached_embeddings of examples 0..n-1; returns (rows as one tensor, report, examples loaded here)."""
    loaded: list[int] = []

    def load(i: int) -> torch.Tensor:
        loaded.append(i)
        return _load(i)

    rows, report = cached_embeddings(ctx, EmbeddingCacheConfig(dir=str(root), **cache), n=n, row_shape=SHAPE,
                                     key=lambda: key, identities=lambda: _ids(n), load=load, encode=encode, chunk=2)
    return torch.stack([rows[i] for i in range(n)]), report, loaded


def _one_rank() -> WorkerContext:
    return WorkerContext(0, 1, 0, torch.device("cpu"), None)


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(f"*/{pattern}"))


def _rank_main(rank: str, init_file: str, root: str, out: str) -> None:
    """One of two ranks (a fresh process each): the store built by both ranks on one host, then on
    two hosts (each rank its own node) in another folder."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=int(rank), world_size=2)
    ctx = WorkerContext(int(rank), 2, int(rank), torch.device("cpu"), None)
    results = {}
    for phase in ("one_node", "two_nodes"):
        if phase == "two_nodes":
            socket.gethostname = lambda: f"node-{rank}"
        rows, report, loaded = _build(ctx, Path(root) / phase)
        results[phase] = {"loaded": loaded, "reused": report.reused, "encoded": report.encoded,
                          "rows": rows.tolist(), "nodes": ctx.node_ranks()}
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


RUN_RANK = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('store_ranks', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._rank_main(*sys.argv[2:])")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two real ranks (processes, gloo) run ``_rank_main``; (store root, each rank's results)."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RUN_RANK, __file__, str(rank), str(tmp / "pg"), str(tmp / "store"),
                               str(tmp)], env=env, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    return tmp / "store", [json.loads((tmp / f"{rank}.json").read_text()) for rank in range(2)]


def test_the_ranks_of_a_node_build_one_file_each_encoding_its_share(two_ranks):
    root, (r0, r1) = two_ranks
    one = root / "one_node"
    assert r0["one_node"]["nodes"] == r1["one_node"]["nodes"] == [0, 1]
    assert len(_files(one, "*.rows")) == len(_files(one, f"*{INDEX_SUFFIX}")) == 1  # one build, complete
    assert sorted(r0["one_node"]["loaded"] + r1["one_node"]["loaded"]) == list(range(N))  # each example once
    assert len(r0["one_node"]["loaded"]) == len(r1["one_node"]["loaded"]) == N // 2
    assert r0["one_node"]["encoded"] == N and r0["one_node"]["reused"] == 0
    for r in (r0, r1):  # every rank reads every row, the encoder's output to float16's precision
        torch.testing.assert_close(torch.tensor(r["one_node"]["rows"]), _expected(N), rtol=1e-3, atol=1e-3)


def test_every_node_builds_its_own_copy_and_concurrent_builds_do_not_collide(two_ranks):
    root, (r0, r1) = two_ranks
    two = root / "two_nodes"
    assert r0["two_nodes"]["nodes"] == [0] and r1["two_nodes"]["nodes"] == [1]  # each rank leads its node
    assert sorted(r0["two_nodes"]["loaded"]) == sorted(r1["two_nodes"]["loaded"]) == list(range(N))
    assert len(_files(two, f"*{INDEX_SUFFIX}")) == 2  # both builds complete, neither overwrote the other
    rows, report, loaded = _build(_one_rank(), two)
    assert loaded == [] and report.reused == N
    torch.testing.assert_close(rows, _expected(N), rtol=1e-3, atol=1e-3)


def test_a_later_job_reuses_every_stored_example_and_encodes_only_new_ones(tmp_path):
    _, first, loaded = _build(_one_rank(), tmp_path)
    assert loaded == list(range(N)) and first.encoded == N
    rows, report, loaded = _build(_one_rank(), tmp_path, n=N + 2)  # the same set and two more images
    assert loaded == [N, N + 1] and (report.reused, report.encoded) == (N, 2) and report.store == first.store
    torch.testing.assert_close(rows, _expected(N + 2), rtol=1e-3, atol=1e-3)  # rows from two builds
    _, report, loaded = _build(_one_rank(), tmp_path, n=N + 2)
    assert loaded == [] and report.reused == N + 2 and len(_files(tmp_path, "*.rows")) == 2


@pytest.mark.parametrize("change", [{"key": {**KEY, "weights": "sha256:1"}},  # another checkpoint
                                    {"key": {**KEY, "image_size": 128}},  # other preprocessing
                                    {"dtype": "float32"}])
def test_another_encoder_preprocessing_or_dtype_is_another_store(tmp_path, change):
    _, first, _ = _build(_one_rank(), tmp_path)
    rows, other, loaded = _build(_one_rank(), tmp_path, **change)
    assert loaded == list(range(N)) and other.store != first.store
    if change.get("dtype") == "float32":
        torch.testing.assert_close(rows, _expected(N), rtol=0, atol=0)


def test_an_interrupted_build_is_never_read_and_is_cleared_a_day_later(tmp_path):
    def dies(x):
        if dies.calls:
            raise RuntimeError("killed")
        dies.calls += 1
        return _encode(x) * 0  # what a half-written file would hold

    dies.calls = 0
    with pytest.raises(RuntimeError, match="killed"):
        _build(_one_rank(), tmp_path, encode=dies)
    [partial] = _files(tmp_path, "*.rows")
    assert _files(tmp_path, f"*{INDEX_SUFFIX}") == []
    rows, report, loaded = _build(_one_rank(), tmp_path)
    assert loaded == list(range(N)) and report.reused == 0
    torch.testing.assert_close(rows, _expected(N), rtol=1e-3, atol=1e-3)
    assert partial.exists()  # it might still be running: left alone until stale
    os.utime(partial, (time.time() - 2 * 86400,) * 2)
    _build(_one_rank(), tmp_path, n=N + 1)
    assert not partial.exists() and len(_files(tmp_path, "*.rows")) == 2


def test_in_memory_holds_the_same_rows_and_writes_nothing(tmp_path):
    stored, _, _ = _build(_one_rank(), tmp_path / "disk")
    held, report, loaded = _build(_one_rank(), tmp_path / "ram", in_memory=True)
    assert torch.equal(held, stored) and held.dtype == torch.float32 and report.store is None
    assert loaded == list(range(N)) and not (tmp_path / "ram").exists()


def test_config_defaults_and_errors_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SONOSYNTH_CACHE_DIR", str(tmp_path))
    cfg = EmbeddingCacheConfig()
    assert (cfg.root(), cfg.dtype, cfg.in_memory) == (tmp_path / "embeddings", "float16", False)
    monkeypatch.delenv("SONOSYNTH_CACHE_DIR")
    assert cfg.root() == Path.home() / ".cache" / "sonosynth" / "embeddings"
    assert EmbeddingCacheConfig(dir="~/emb").root() == Path.home() / "emb"
    with pytest.raises(ConfigError, match="local path"):
        build(EmbeddingCacheConfig, {"dir": "s3://bucket/emb"})
    with pytest.raises(ConfigError, match="null for the default"):
        build(EmbeddingCacheConfig, {"dir": " "})
    with pytest.raises(ConfigError, match="dtype"):
        build(EmbeddingCacheConfig, {"dtype": "bfloat16"})
    (tmp_path / "a-file").write_text("")  # a store that cannot be made: every rank is told, none waits
    with pytest.raises(RuntimeError, match="could not plan the embedding store under .*a-file"):
        _build(_one_rank(), tmp_path / "a-file")
