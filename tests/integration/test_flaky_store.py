"""A pipeline (ingest -> train-lora -> generate) writing everything to s3:// through a proxy in
front of a real moto_server that throttles, loses acknowledgements of writes that happened,
cuts bodies mid-way, resets connections and answers slowly; the MLflow server keeps its
artifacts in the same bucket through the same proxy.

First run: the faults fire and one shard's object never gets written (a fault that never
clears): exit 1 naming the object, the endpoint and the tries. Second run, that fault gone
(the others still firing): it resumes, exit 0. Then: exactly N unique samples read back
through the faults, the shards written before the failure untouched, no temporary or
partial object in the bucket, retries logged with the object and the attempt, and MLflow's
artifacts in the bucket.
"""

from __future__ import annotations

import re

import boto3
import pytest

from sonosynth.infra.local.flaky_s3 import Faults

pytestmark = pytest.mark.integration
N = 8
FAULTS = Faults(slowdown=0.03, lost_ack=0.05, cut_body=0.05, reset=0.02, slow=0.02, slow_s=0.1, max_count=4, seed=7)
STUCK = r"/shards/syn-[0-9a-f]+-000002\.tar"
RECIPE = """
out: s3://{bucket}/nightly
tracking: {{experiment: sonosynth-flaky}}
stages:
  real:
    stage: ingest
    cohort: {{name: hc18, src: {data}/hc18_sample}}
    splits: {{val: 0.2, test: 0.0}}
  lora:
    stage: train-lora
    recipe: lora_joint_tiny
    data: {{dataset: "${{real.out}}"}}
    engine: {{workers: 1, max_steps: 4, checkpoint_every: 2, log_every: 2}}
    preview: {{num: 1, steps: 2}}
  synthetic:
    stage: generate
    recipe: generate_tiny
    num_samples: {n}
    shard_size: 2
    workers: 1
    plane: brain
    sampler: {{lora: "${{lora.outputs.model}}", steps: 2}}
    qc: {{enforce: false}}
"""


@pytest.fixture(scope="module")
def tracking_via_proxy(tmp_path_factory, moto_endpoint, flaky_s3_proxy):
    """An MLflow server whose artifacts live in S3 behind the flaky proxy."""
    import uuid

    from sonosynth.infra.local_mlflow import mlflow_server

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with mlflow_server(tmp_path_factory.mktemp("mlflow-flaky"), artifacts=f"s3://{bucket}/mlflow",
                       env={**creds, "MLFLOW_S3_ENDPOINT_URL": flaky_s3_proxy.url}) as url:
        yield url, bucket


def objects(moto_endpoint: str, bucket: str) -> dict[str, str]:
    """key -> ETag of every object, read from moto directly; fails on unfinished multipart uploads."""
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "a multipart upload was left open"
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return found


def test_a_pipeline_through_a_flaky_store_fails_naming_a_stuck_object_then_resumes_to_exactly_n(
        tmp_path, s3_bucket, flaky_s3, moto_endpoint, tracking_via_proxy, shared_data, procs):
    mlflow_url, mlflow_bucket = tracking_via_proxy
    recipe = tmp_path / "flaky.yaml"
    recipe.write_text(RECIPE.format(bucket=s3_bucket, data=shared_data, n=N))
    env = procs.env(AWS_ENDPOINT_URL=flaky_s3.url, MLFLOW_TRACKING_URI=mlflow_url, AWS_ACCESS_KEY_ID="testing",
                    AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    command = ["pipeline", str(recipe), "--no-progress"]

    flaky_s3.set_faults(FAULTS)
    flaky_s3.break_forever(STUCK, kind="slowdown")
    failed = procs.cli(command, cwd=tmp_path, env=env, timeout=600, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1, output[-4000:]
    stuck = re.search(r"put (s3://\S+/shards/syn-[0-9a-f]+-000002\.tar) failed after (\d+) tries at S3 endpoint "
                      + re.escape(flaky_s3.url), output)
    assert stuck, output[-4000:]
    assert "Traceback" not in output.splitlines()[-3:]
    before = objects(moto_endpoint, s3_bucket)
    kept = {k: v for k, v in before.items() if re.search(r"/shards/syn-.*\.tar$", k)}
    assert kept and not any(k.endswith("000002.tar") for k in kept)

    flaky_s3.heal()
    resumed = procs.cli(command, cwd=tmp_path, env=env, timeout=600, check=False)
    output += resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    fired = flaky_s3.counts
    assert all(fired[k] > 0 for k in ("slowdown", "lost_ack", "cut_body", "reset")), fired

    after = objects(moto_endpoint, s3_bucket)
    assert {k: after[k] for k in kept} == kept, "shards written before the failure were rewritten"
    assert not [k for k in after if ".partial" in k or "/.tmp" in k or k.endswith(".tmp")]
    retries = [line for line in output.splitlines() if re.search(r"retry \d+/\d+", line)]
    assert retries and all("s3://" in line or "http" in line for line in retries), retries[:5]

    from sonosynth.datasets.reader import DatasetReader
    from sonosynth.infra.storage import StorageConfig

    [synthetic] = {m.group(1) for k in after if (m := re.match(r"(nightly/synthetic/[^/]+)/manifest", k))}
    keys = [s.key for s in DatasetReader(f"s3://{s3_bucket}/{synthetic}", distributed=False,
                                          storage=StorageConfig(endpoint_url=flaky_s3.url, backoff_s=0.05)).samples()]
    assert len(keys) == len(set(keys)) == N
    assert any(k.startswith("mlflow/") for k in objects(moto_endpoint, mlflow_bucket)), "no MLflow artifact in S3"
