"""The node cache: one download per record batch whoever asks, no half-written entry ever read, and a
bounded cache that evicts by the known future order."""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from dataloaders import open_dataset
from dataloaders.cache import BatchCache, temporary_cache
from dataloaders.dataset import ReadOptions
from dataloaders.sampler.order import GlobalOrder
from dataloaders.shards.reader import ShardReader
from tests.dataloaders.conftest import write_small


@pytest.fixture
def batched(tmp_path) -> str:
    return write_small(str(tmp_path / "ds"), n=64, shard_rows=32, batch_rows=8)


def race_for_one_batch(url: str, cache_dir: str, start, results) -> None:
    """In a fresh process: wait for the start signal, then read record batch 2 through the shared cache, with
    storage slowed down so that the two processes' requests overlap."""
    from dataloaders import storage

    slow = storage.read_range

    def read_range(*args, **kwargs):
        time.sleep(0.5)
        return slow(*args, **kwargs)

    storage.read_range = read_range
    ds = open_dataset(url)
    reader = ShardReader(ds.manifest, ds.record_batches(), cache=BatchCache(cache_dir, ds.manifest.fingerprint))
    start.wait()
    batch = reader.read_batches([2])[2]
    results.put((dict(reader.counters), batch.columns["sample_id"].tolist()))


def test_two_processes_racing_for_one_cache_entry_download_it_once(batched, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=race_for_one_batch, args=(batched, str(tmp_path / "cache"), start, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    start.set()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    counters = [c for c, _ in got]
    assert sorted(c.get("get_requests", 0) for c in counters) == [0, 1], counters
    assert sorted(c.get("cache_waits", 0) for c in counters) == [0, 1], counters
    assert got[0][1] == got[1][1] == list(range(16, 24))
    left = [p.name for p in (tmp_path / "cache").glob("*/*")]
    assert left == ["000000002.arrow-batch"]  # no claim, no temporary file


def test_a_waiter_fetches_the_batch_itself_when_its_claimant_died(batched, tmp_path):
    ds = open_dataset(batched)
    cache = BatchCache(str(tmp_path / "cache"), ds.manifest.fingerprint)
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    cache._claim_path(3).write_text(f"{__import__('socket').gethostname()} {dead.pid}")
    reader = ShardReader(ds.manifest, ds.record_batches(), cache=cache)
    t0 = time.monotonic()
    batch = reader.read_batches([3])[3]
    assert time.monotonic() - t0 < 5 and batch.columns["sample_id"].tolist() == list(range(24, 32))
    assert reader.counters["get_requests"] == 1 and cache.get(3) is not None


def test_a_half_written_entry_is_never_read(batched, tmp_path):
    ds = open_dataset(batched)
    index = ds.record_batches()
    cache = BatchCache(str(tmp_path / "cache"), ds.manifest.fingerprint)
    assert cache.claim(5)  # another writer of this node (here: a thread) is fetching batch 5...
    shard = Path(batched).parent / ds.manifest.shards[1].path
    whole = shard.read_bytes()[index.offset[5]:index.offset[5] + index.length[5]]
    partial = cache.dir / f".tmp-1-0-{cache._path(5).name}"
    partial.write_bytes(whole[:100])  # ...and is half-way through writing it

    def finish() -> None:
        time.sleep(0.5)
        partial.unlink()
        cache.put(5, whole)

    writer = threading.Thread(target=finish)
    writer.start()
    reader = ShardReader(ds.manifest, index, cache=cache)
    batch = reader.read_batches([5])[5]
    writer.join()
    assert batch.columns["sample_id"].tolist() == list(range(40, 48))
    assert reader.counters == {"cache_waits": 1}  # it waited for the rename, and fetched nothing itself


def test_a_corrupt_cached_entry_is_fetched_again(batched, tmp_path):
    ds = open_dataset(batched)
    cache = BatchCache(str(tmp_path / "cache"), ds.manifest.fingerprint)
    ShardReader(ds.manifest, ds.record_batches(), cache=cache).read_batches([1])
    path = cache._path(1)
    path.write_bytes(b"\0" * path.stat().st_size)
    os.utime(path, (cache.opened - 3600, cache.opened - 3600))  # rotted at rest, since an earlier run
    reader = ShardReader(ds.manifest, ds.record_batches(), cache=cache)
    assert reader.read_batches([1])[1].columns["sample_id"].tolist() == list(range(8, 16))
    assert reader.counters["get_requests"] == 1 and cache.get(1).to_pybytes() != b"\0" * path.stat().st_size


def test_entries_of_earlier_runs_are_verified_once_and_this_runs_are_trusted(batched, tmp_path, monkeypatch):
    ds = open_dataset(batched)
    earlier = BatchCache(str(tmp_path / "cache"), ds.manifest.fingerprint)
    ShardReader(ds.manifest, ds.record_batches(), cache=earlier).read_batches([1, 2])
    for b in (1, 2):
        os.utime(earlier._path(b), (earlier.opened - 60, earlier.opened - 60))
    cache = BatchCache(str(tmp_path / "cache"), ds.manifest.fingerprint)
    ShardReader(ds.manifest, ds.record_batches(), cache=cache).read_batches([3])  # published in this run
    crcs = []
    crc32 = zlib.crc32
    monkeypatch.setattr(zlib, "crc32", lambda data, *a: crcs.append(len(data)) or crc32(data, *a))
    reader = ShardReader(ds.manifest, ds.record_batches(), cache=cache)
    for _ in range(2):
        got = reader.read_batches([1, 2, 3])
        assert [got[b].columns["sample_id"].tolist() for b in (1, 2, 3)] == [list(range(8 * b, 8 * b + 8))
                                                                            for b in (1, 2, 3)]
    assert reader.counters == {"cache_hits": 6, "cache_checks": 2}  # 1 and 2 checked on first use only
    assert len(crcs) == 2 and not reader.counters["get_requests"]
    # a truncated entry fails its length check even when trusted, and is fetched again
    cache._path(3).write_bytes(cache._path(3).read_bytes()[:-1])
    assert reader.read_batches([3])[3].columns["sample_id"].tolist() == list(range(24, 32))
    assert reader.counters["get_requests"] == 1


def test_next_use_is_the_distance_to_the_block_that_needs_a_batch():
    rows, shards = [8] * 40, np.repeat(np.arange(10), 4)
    order = GlobalOrder(rows, seed=3, block_size=64, batch_shards=shards, partitions=2, global_batch_size=16)
    position = 5 * 16  # global batch 5: each partition is 40 positions into its pass
    _, later, _ = order.locate(position, 3 * order.num_samples)
    partition, k = order.pass_position(np.arange(position, position + 3 * order.num_samples))
    for b in range(40):
        mine = order.partition_of[b] == 0
        got = order.next_use(np.array([b]), position, partitions=[0])[0]
        if not mine:
            assert got == np.inf
            continue
        first = k[np.flatnonzero(later == b)[0]] - k[0]  # the reference: the first position that reads it
        assert got <= first and first - got < order.block_size + 8  # block granularity: never late, at most a block early


def test_a_bounded_cache_evicts_what_is_needed_last(tmp_path):
    cache = BatchCache(str(tmp_path), "f" * 16, max_bytes=1000)
    cache.next_use = lambda ids: np.array([{1: 5.0, 2: np.inf, 3: 50.0, 4: 0.0}[int(i)] for i in ids])
    for i in (1, 2, 3):
        cache.put(i, b"x" * 300)
    cache.put(4, b"x" * 400)  # 1300 > 1000: down to 90 %, dropping the never-needed one, then the one needed at 50
    assert sorted(cache.entries()) == [1, 4]


def test_each_record_batch_is_fetched_once_per_node_whatever_the_worker_count(s3_bucket, tmp_path):
    url = write_small(f"{s3_bucket}/ds", n=128, shard_rows=32, batch_rows=8)
    ds = open_dataset(url)
    index = ds.record_batches()
    read = ReadOptions(cache_dir=str(tmp_path / "node"), fetch_threads=2)
    loaders = [ds.loader(rank=r, world_size=2, global_batch_size=32, seed=0, shuffle_block_size=32, num_workers=2,
                         prefetch=1, read=read) for r in range(2)]
    streams = [iter(loader) for loader in loaders]
    for _ in range(4):  # the epoch
        for s in streams:
            next(s)
    for loader in loaders:
        loader.close()
    gets = sum(loader.io["get_requests"] for loader in loaders)
    fetched = sum(loader.io["bytes_fetched"] for loader in loaders)
    tails = sum(ds.manifest.shards[int(index.shard[b])].bytes - int(index.offset[b] + index.length[b])
                for b in range(len(index)) if index.last[b])
    assert fetched == int(index.length.sum()) + tails and gets <= len(index)


def test_a_temporary_cache_whose_process_died_is_removed_by_the_next_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    host = socket.gethostname()
    owners = {"dead": f"{host} {dead.pid}", "alive": f"{host} {os.getpid()}", "elsewhere": f"other-host {dead.pid}"}
    for name, owner in owners.items():
        (tmp_path / f"flowscale-loader-{name}" / "ab").mkdir(parents=True)
        (tmp_path / f"flowscale-loader-{name}" / "owner").write_text(owner)
    (tmp_path / "flowscale-loader-starting").mkdir()  # its owner file is not written yet
    new = Path(temporary_cache())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["flowscale-loader-alive", "flowscale-loader-elsewhere", "flowscale-loader-starting", new.name])
    assert new.parent == tmp_path and (new / "owner").read_text() == f"{host} {os.getpid()}"


def test_the_first_batch_is_claimed_until_written_and_written_by_close(batched, tmp_path):
    """The first batch's record batches are published by a writer thread, so that the batch does not wait for
    the writes; until an entry is written its claim stays, so no other process fetches it meanwhile."""
    ds = open_dataset(batched)
    cache_dir = tmp_path / "node"
    loader = ds.loader(rank=0, world_size=1, global_batch_size=len(ds), seed=0, shuffle_block_size=len(ds),
                       read=ReadOptions(cache_dir=str(cache_dir)))
    batch = next(iter(loader))
    cache = BatchCache(str(cache_dir), ds.manifest.fingerprint)
    record_batches = len(ds.record_batches())
    for i in range(record_batches):  # each published, or claimed by this process while being written
        assert cache.has(i) or cache._claim_path(i).exists(), i
    loader.close()  # waits for the writer
    assert sorted(cache.entries()) == list(range(record_batches))
    assert not list(cache.dir.glob(".claim-*")) and not list(cache.dir.glob(".tmp-*"))
    assert sorted(batch["sample_id"].tolist()) == list(range(len(ds)))


def test_a_fetch_that_ends_after_its_stream_closed_still_publishes_and_releases(batched, tmp_path):
    """A fetch in flight when the stream closes finds its writer shut down: it writes the entries itself, so
    no claim outlives it (other ranks would wait on it for stale_after_s)."""
    from concurrent.futures import ThreadPoolExecutor

    ds = open_dataset(batched)
    cache = BatchCache(str(tmp_path / "node"), ds.manifest.fingerprint)
    reader = ShardReader(ds.manifest, ds.record_batches(), cache=cache)
    closed = ThreadPoolExecutor(1)
    closed.shutdown()
    out = reader.read_batches([0, 1], publish_with=closed)
    assert sorted(out) == [0, 1] and sorted(cache.entries()) == [0, 1]
    assert not list(cache.dir.glob(".claim-*"))
