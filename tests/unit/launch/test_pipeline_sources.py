"""New labelled data retrains: an ingest section's key holds its source's fingerprint.

A real ingest of real HC18 images (a local folder, and an s3:// prefix on moto_server) feeds a
toy stage that counts the manifest's rows; adding, changing or removing source files re-runs
both, and nothing new skips both.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import yaml

from sonosynth.infra.config import Config
from sonosynth.infra.stage import Report
from sonosynth.infra.storage import open_storage
from sonosynth.launch import stages
from sonosynth.launch.pipeline import plan, resolve_pipeline, run


class CountConfig(Config):
    out: str
    """Output."""
    dataset: str
    """The ingested dataset."""


def run_count(cfg: CountConfig) -> Report:
    from sonosynth.datasets.manifest import read_manifest

    n = len(read_manifest(open_storage(cfg.dataset)))
    open_storage(cfg.out).put_text("count.txt", str(n))
    return Report(stage="toy-count", out=cfg.out, figures={"rows": n})


@pytest.fixture(autouse=True)
def toy_count(monkeypatch):
    monkeypatch.setitem(stages.STAGES, "toy-count", stages.Stage("toy-count", "t", lambda: (CountConfig, run_count)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def copy_heads(shared_data: Path, dest: Path, names: list[str]) -> None:
    for sub in ("image", "mask"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(shared_data / "hc18_sample" / "image" / name, dest / "image" / name)
        mask = name.replace(".png", "_Annotation.png")
        shutil.copy2(shared_data / "hc18_sample" / "mask" / mask, dest / "mask" / mask)


def head_names(shared_data: Path) -> list[str]:
    return sorted(p.name for p in (shared_data / "hc18_sample" / "image").glob("*.png"))


def pipeline(tmp_path: Path, src: str, out: str, tracking_uri: str | None = None):
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump({"out": out, "tracking": {"uri": tracking_uri}, "stages": {
        "real": {"stage": "ingest", "cohort": {"name": "hc18", "src": src, "cache_dir": str(tmp_path / "mirror")},
                 "splits": {"val": 0.2, "test": 0.0}, "progress": False},
        "count": {"stage": "toy-count", "dataset": "${real.out}"}}}, sort_keys=False))
    return resolve_pipeline(str(path), {}, [])


def statuses(report) -> dict[str, str]:
    return {k: v["status"] for k, v in report.figures["stages"].items()}


def counted(out: str, report) -> int:
    key = report.figures["stages"]["count"]["key"]
    return int(open_storage(out).get_text(f"count/{key}/count.txt"))


def test_new_or_removed_source_images_rerun_ingest_and_what_reads_it(tmp_path, shared_data):
    names = head_names(shared_data)
    src, out = tmp_path / "source", str(tmp_path / "out")
    copy_heads(shared_data, src, names[:6])
    first = run(pipeline(tmp_path, str(src), out))
    assert statuses(first) == {"real": "ran", "count": "ran"} and counted(out, first) == 6

    again = run(pipeline(tmp_path, str(src), out))
    assert statuses(again) == {"real": "skipped (done)", "count": "skipped (done)"}
    assert again.figures["pipeline_key"] == first.figures["pipeline_key"]

    copy_heads(shared_data, src, names[6:9])  # a new night's labelled images
    grown = run(pipeline(tmp_path, str(src), out))
    assert statuses(grown) == {"real": "ran", "count": "ran"} and counted(out, grown) == 9

    for sub, suffix in (("image", ".png"), ("mask", "_Annotation.png")):
        (src / sub / names[0].replace(".png", suffix)).unlink()
    shrunk = run(pipeline(tmp_path, str(src), out))
    assert statuses(shrunk) == {"real": "ran", "count": "ran"} and counted(out, shrunk) == 8

    rows = list(csv.DictReader(open(Path(out) / "lineage.csv")))
    source = {r["section"]: r["source"] for r in rows}
    step = next(s for s in plan(pipeline(tmp_path, str(src), out)) if s.section == "real")
    assert source == {"real": f"{step.source['digest']} (16 files)", "count": ""}


def test_an_s3_source_that_gains_images_retrains_and_is_recorded_in_mlflow(tmp_path, shared_data, s3_bucket):
    import boto3
    from mlflow import MlflowClient

    names = head_names(shared_data)
    staged = tmp_path / "staged"
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def publish(chosen: list[str]) -> None:
        copy_heads(shared_data, staged, chosen)
        for path in sorted(p for p in staged.rglob("*.png")):
            s3.upload_file(str(path), s3_bucket, f"sources/hc18/{path.relative_to(staged).as_posix()}")

    publish(names[:5])
    src, out = f"s3://{s3_bucket}/sources/hc18", f"s3://{s3_bucket}/nightly"
    cfg = pipeline(tmp_path, src, out, f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = run(cfg)
    assert statuses(first) == {"real": "ran", "count": "ran"} and counted(out, first) == 5
    assert statuses(run(cfg)) == {"real": "skipped (done)", "count": "skipped (done)"}
    publish(names[5:8])
    grown = run(cfg)
    assert statuses(grown) == {"real": "ran", "count": "ran"} and counted(out, grown) == 8

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    digest = {name: client.get_run(r.tracking["run_id"]).data.params["source.real"] for name, r in
              (("first", first), ("grown", grown))}
    now = next(s for s in plan(cfg) if s.section == "real").source
    assert digest["grown"] == f"{now['digest']} (16 files)" and digest["first"].endswith("(10 files)")
    parent = client.get_run(grown.tracking["run_id"])
    ingest_runs = client.search_runs([parent.info.experiment_id], "tags.`sonosynth.pipeline_section` = 'real'")
    assert sorted(r.data.tags["sonosynth.source_fingerprint"] for r in ingest_runs) == \
        sorted(d.split()[0] for d in digest.values())
