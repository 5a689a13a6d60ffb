"""Storage faults (errors, resets, stalls, truncated bodies) on a third of the requests: the epoch
still completes, every sample exactly once with the columns written for it, and nothing hangs."""

from __future__ import annotations

import signal

import pytest

from dataloaders import open_dataset
from dataloaders.dataset import ReadOptions
from tests.dataloaders.conftest import assert_rows_match_ids, write_small
from tests.dataloaders.fault_proxy import FAULTS, FaultProxy


@pytest.fixture
def deadline():
    """Fail, rather than hang, if the epoch is not done in time."""
    def expire(*_):
        raise TimeoutError("the loader hung behind the faulty proxy")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(150)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_completes_exactly_once_through_faults(s3_bucket, s3_env, deadline, workers):
    url = write_small(f"{s3_bucket}/ds", n=160, shard_rows=10)  # written straight to the server
    with FaultProxy(s3_env, period=3, stall_s=3.0) as proxy:
        options = {"endpoint_url": proxy.url}
        ds = open_dataset(url, storage_options=options, retries=8, timeout_s=1.0)
        read = ReadOptions(storage_options=options, retries=8, timeout_s=1.0, fetch_threads=4)
        loader = ds.loader(rank=0, world_size=1, global_batch_size=40, seed=0, shuffle_block_size=40,
                           num_workers=workers, prefetch=2, read=read)
        stream = iter(loader)
        batches = [next(stream) for _ in range(4)]
        loader.close()
    for batch in batches:
        assert_rows_match_ids(batch)
    assert sorted(i for batch in batches for i in batch["sample_id"].tolist()) == list(range(160))
    assert all(proxy.injected[f] >= 1 for f in FAULTS), proxy.injected
