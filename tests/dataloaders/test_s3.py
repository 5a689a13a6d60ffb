"""Datasets on S3 (moto's server over HTTP): same samples as on local disk, workers included."""

from __future__ import annotations

import torch

from dataloaders import open_dataset, storage
from dataloaders.prepare import main as prepare_main
from tests.dataloaders.conftest import assert_rows_match_ids, write_small


def one_epoch(source, workers: int = 0, **kw) -> dict:
    """The whole first epoch as one batch; ``source`` is a URL or an opened dataset."""
    ds = open_dataset(source) if isinstance(source, str) else source
    loader = ds.loader(rank=0, world_size=1, global_batch_size=len(ds), seed=3, shuffle_block_size=64,
                       num_workers=workers, prefetch=1, **kw)
    batch = next(iter(loader))
    loader.close()
    return batch


def test_s3_and_local_copies_give_identical_samples(s3_bucket, tmp_path):
    local = one_epoch(write_small(str(tmp_path / "ds"), n=120))
    remote = one_epoch(write_small(f"{s3_bucket}/ds", n=120), workers=2)
    assert_rows_match_ids(remote)
    assert local.keys() == remote.keys()
    for key, value in local.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == remote[key].dtype and torch.equal(value, remote[key]), key
        else:
            assert value == remote[key], key
    assert local["latent"].dtype == torch.bfloat16  # bf16 survives the round trip


def test_prepare_digits_writes_to_s3(s3_bucket):
    prepare_main(["digits", "--out", f"{s3_bucket}/digits"])
    batch = one_epoch(f"{s3_bucket}/digits/manifest.json")
    assert sorted(batch["sample_id"].tolist()) == list(range(1797))
    assert batch["latent"].shape == (1797, 1, 8, 8)


def test_explicit_storage_options_override_the_environment(s3_bucket, s3_env, monkeypatch):
    url = write_small(f"{s3_bucket}/ds", n=40)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    ds = open_dataset(url, storage_options={"endpoint_url": s3_env})
    assert len(ds) == 40
    batch = one_epoch(ds)
    assert len(batch["caption"]) == 40
    assert_rows_match_ids(batch)


def test_a_process_reads_a_dataset_through_one_s3_client(s3_bucket, s3_env, monkeypatch):
    """Manifest, record-batch index and shards share one client (each new one costs ~0.1 s before its first
    byte); other settings or another AWS environment get their own."""
    url = write_small(f"{s3_bucket}/ds", n=40, batch_rows=8)
    monkeypatch.setattr(storage, "_PROCESS_FILESYSTEMS", {})
    built = []
    real = storage.url_to_fs
    monkeypatch.setattr(storage, "url_to_fs", lambda *a, **kw: built.append(a[0]) or real(*a, **kw))
    assert_rows_match_ids(one_epoch(url))
    assert len(built) == 1, built
    shared = storage.filesystem(url)[0]
    assert storage.filesystem(url, timeout_s=5.0)[0] is not shared
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another")
    assert storage.filesystem(url)[0] is not shared
