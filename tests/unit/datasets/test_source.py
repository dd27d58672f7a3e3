"""Source listings and fingerprints (local and S3 on moto_server), and the S3 mirror."""

from __future__ import annotations

import os
import shutil

import pytest

from sonosynth.datasets.source import fingerprint, listing, mirror


@pytest.fixture
def heads(tmp_path, shared_data):
    """Six real HC18 images with their masks, in the sample's image/ + mask/ layout."""
    src = tmp_path / "heads"
    for sub in ("image", "mask"):
        (src / sub).mkdir(parents=True)
    for image in sorted((shared_data / "hc18_sample" / "image").glob("*.png"))[:6]:
        shutil.copy2(image, src / "image" / image.name)
        mask = shared_data / "hc18_sample" / "mask" / f"{image.stem}_Annotation.png"
        shutil.copy2(mask, src / "mask" / mask.name)
    return src


def test_a_local_fingerprint_changes_with_new_changed_or_removed_files_only(heads):
    first = fingerprint([str(heads)])
    assert first.files == 12 and first == fingerprint([str(heads)])
    (heads / ".DS_Store").write_bytes(b"junk")  # hidden files are not data
    assert fingerprint([str(heads)]) == first
    extra = heads / "image" / "999_HC.png"
    shutil.copy2(next((heads / "image").glob("*.png")), extra)
    added = fingerprint([str(heads)])
    assert added.files == 13 and added.digest != first.digest
    extra.unlink()
    assert fingerprint([str(heads)]).digest == first.digest
    victim = next((heads / "mask").glob("*.png"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert fingerprint([str(heads)]).digest != first.digest


def test_stat_mode_sees_a_touch_and_content_mode_does_not(heads):
    stat, content = fingerprint([str(heads)]), fingerprint([str(heads)], "content")
    image = next((heads / "image").glob("*.png"))
    os.utime(image, (1_000_000, 1_000_000))
    assert fingerprint([str(heads)]).digest != stat.digest
    assert fingerprint([str(heads)], "content").digest == content.digest


def test_a_missing_source_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"source {tmp_path / 'nope'} does not exist"):
        fingerprint([str(tmp_path / "nope")])


def upload(folder, bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_an_s3_source_is_listed_with_etags_and_mirrored_incrementally(heads, s3_bucket, tmp_path):
    import boto3

    upload(heads, s3_bucket, "sources/hc18")
    upload(heads, s3_bucket, "sources/hc18-other")  # a sibling prefix is not part of the source
    uri = f"s3://{s3_bucket}/sources/hc18"
    infos = listing(uri)
    assert len(infos) == 12 and all(i.key.startswith(("image/", "mask/")) for i in infos)
    assert all(len(i.version) == 32 for i in infos)  # the ETag (MD5 of a single-part upload)
    first = fingerprint([uri])
    cache = tmp_path / "cache"
    local = mirror(uri, cache)
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png")) == [i.key for i in infos]

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=s3_bucket, Key="sources/hc18/image/999_HC.png",
                  Body=(heads / "image" / infos[0].key.split("/")[1]).read_bytes())
    s3.delete_object(Bucket=s3_bucket, Key=f"sources/hc18/{infos[-1].key}")
    second = fingerprint([uri])
    assert second.digest != first.digest and second.files == 12
    untouched = local / infos[1].key
    before = untouched.stat().st_mtime_ns
    assert mirror(uri, cache) == local
    assert (local / "image" / "999_HC.png").is_file() and not (local / infos[-1].key).exists()
    assert untouched.stat().st_mtime_ns == before  # unchanged objects are not downloaded again


def test_an_s3_index_file_is_one_object(heads, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=s3_bucket, Key="idx/index.csv", Body=b"image,plane\n1_HC.png,brain\n")
    s3.put_object(Bucket=s3_bucket, Key="idx/index.csv.bak", Body=b"old")
    (info,) = listing(f"s3://{s3_bucket}/idx/index.csv")
    assert info.key == "index.csv" and info.size == 27
    assert mirror(f"s3://{s3_bucket}/idx/index.csv", tmp_path).read_bytes().startswith(b"image,plane")
