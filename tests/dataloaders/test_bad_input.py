"""Bad input: every error names the URL and the shard; the skip policy counts what it skips."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from dataloaders import (CorruptShardError, DatasetWriter, ManifestError, SchemaMismatchError,
                         StorageAccessError, open_dataset)
from dataloaders.dataset import ReadOptions
from tests.dataloaders.conftest import assert_rows_match_ids, write_small


def read_epoch(url: str, on_corrupt: str = "fail", storage_options: dict | None = None, **kw):
    ds = open_dataset(url, storage_options=storage_options)
    read = ReadOptions(storage_options=storage_options or {}, on_corrupt=on_corrupt, retries=1, **kw)
    loader = ds.loader(rank=0, world_size=1, global_batch_size=len(ds), seed=0, read=read, shuffle_block_size=64)
    return next(iter(loader)), loader


def first_shard(url: str) -> tuple[Path, dict]:
    manifest = json.loads(Path(url).read_text())
    return Path(url).parent / manifest["shards"][0]["path"], manifest["shards"][0]


def test_missing_manifest_names_the_url(tmp_path):
    with pytest.raises(ManifestError, match=f"{tmp_path}/nothing/manifest.json"):
        open_dataset(str(tmp_path / "nothing"))


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "something-else"}', "is not a flowscale-arrow-shards manifest"),
    ('{"format": "flowscale-arrow-shards", "version": 99}', "format version 99"),
    ('{"format": "flowscale-arrow-shards", "version": 1, "columns": []}', "missing or bad key 'shards'"),
])
def test_malformed_manifest_says_what_is_wrong(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=message):
        open_dataset(str(tmp_path))


def test_half_written_dataset_is_not_readable(tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        with DatasetWriter(str(tmp_path / "ds"), shard_rows=2, require_columns=("sample_id",)) as w:
            w.write({"sample_id": np.arange(5)})  # two shards are already out
            raise RuntimeError("interrupted")
    assert list((tmp_path / "ds" / "shards").iterdir())
    with pytest.raises(ManifestError, match="manifest.json"):
        open_dataset(str(tmp_path / "ds"))


def test_truncated_shard_is_corrupt(small_local):
    path, info = first_shard(small_local)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptShardError, match=f"shard .*{info['path']} is corrupt: .*truncated"):
        read_epoch(small_local)


def flip_a_bit_in_the_first_shard_and_expect_a_checksum_error(url: str) -> None:
    path, info = first_shard(url)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"{info['path']} is corrupt: checksum differs"):
        read_epoch(url)


def test_bit_flip_fails_the_checksum(small_local):
    flip_a_bit_in_the_first_shard_and_expect_a_checksum_error(small_local)


def test_manifest_with_the_early_bare_sha256_key_is_read_and_verified(small_local):
    """Datasets written before shard checksums were "<algorithm>:<hex>" stored a bare "sha256" per shard."""
    manifest = json.loads(Path(small_local).read_text())
    for shard in manifest["shards"]:
        del shard["checksum"]
        shard["sha256"] = hashlib.sha256((Path(small_local).parent / shard["path"]).read_bytes()).hexdigest()
    Path(small_local).write_text(json.dumps(manifest))
    batch, _ = read_epoch(small_local)
    assert len(batch["sample_id"]) == manifest["num_samples"]
    flip_a_bit_in_the_first_shard_and_expect_a_checksum_error(small_local)


def test_skip_policy_drops_and_counts_the_corrupt_shards_samples(small_local):
    path, info = first_shard(small_local)
    path.write_bytes(b"\0" * info["bytes"])
    batch, loader = read_epoch(small_local, on_corrupt="skip")
    skipped_ids = set(range(info["rows"]))  # the first shard holds samples 0..rows-1
    assert sorted(batch["sample_id"].tolist()) == sorted(set(range(300)) - skipped_ids)
    assert_rows_match_ids(batch)  # the kept rows stay aligned with their ids
    assert dict(loader.skipped) == {info["path"]: info["rows"]}
    assert loader.state_dict()["skipped_samples"] == info["rows"]


def test_schema_mismatch_between_shards_names_shard_and_column(tmp_path, small_local):
    other = tmp_path / "other"
    with DatasetWriter(str(other), shard_rows=32) as w:  # same columns, latent stored as float32
        w.write({"sample_id": np.arange(32), "latent": torch.zeros(32, 2, 2, 2),
                 "text_tokens": torch.zeros(32, 3, 4), "text_pooled": np.zeros((32, 4), np.float16),
                 "caption": ["x"] * 32})
    foreign, foreign_info = first_shard(str(other / "manifest.json"))
    path, _ = first_shard(small_local)
    path.write_bytes(foreign.read_bytes())
    manifest = json.loads(Path(small_local).read_text())
    manifest["shards"][0].update(bytes=foreign_info["bytes"], checksum=foreign_info["checksum"])
    Path(small_local).write_text(json.dumps(manifest))
    with pytest.raises(SchemaMismatchError, match="column 'latent' .*manifest says tensor bfloat16"):
        read_epoch(small_local)


def test_missing_object_on_s3_is_named(s3_bucket):
    url = write_small(f"{s3_bucket}/ds", n=64)
    manifest = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket[5:], Key="ds/manifest.json")["Body"].read())
    boto3.client("s3").delete_object(Bucket=s3_bucket[5:], Key=f"ds/{manifest['shards'][1]['path']}")
    with pytest.raises(StorageAccessError, match=f"{s3_bucket}/ds/{manifest['shards'][1]['path']} does not exist"):
        read_epoch(url)


@pytest.fixture
def s3_auth_enforced(s3_env):
    """moto checks access keys from now on (only the IAM users it knows are valid)."""
    def set_count(value: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{s3_env}/moto-api/reset-auth", data=value.encode(),
                                                      headers={"Content-Type": "text/plain"}, method="POST")).read()
    set_count("0")
    yield
    set_count("inf")


def test_denied_credentials_say_so(s3_bucket, s3_auth_enforced):
    with pytest.raises(ManifestError, match=f"{s3_bucket}/ds/manifest.json was denied"):
        open_dataset(f"{s3_bucket}/ds")


def test_local_cache_serves_shards_and_stays_in_budget(tmp_path, small_local):
    cache = tmp_path / "cache"
    full, _ = read_epoch(small_local, cache_dir=str(cache))
    for shard in (Path(small_local).parent / "shards").iterdir():
        shard.unlink()  # from now on only the cache has them
    again, _ = read_epoch(small_local, cache_dir=str(cache))
    assert torch.equal(full["sample_id"], again["sample_id"])
    assert_rows_match_ids(again)


def test_cache_eviction_keeps_the_byte_budget(tmp_path, small_local):
    cache, budget = tmp_path / "cache", 12000  # room for three of the ~3.5 kB record batches
    _, loader = read_epoch(small_local, cache_dir=str(cache), cache_bytes=budget)
    loader.close()  # the first batch's record batches are written to the cache after it is built
    sizes = [p.stat().st_size for d in cache.iterdir() for p in d.iterdir()]
    assert 0 < sum(sizes) <= budget and len(sizes) <= 3  # 10 record batches were read
