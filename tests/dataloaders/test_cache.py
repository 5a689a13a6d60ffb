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
from dataloaders.errors import CorruptShardError, StorageAccessError
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
    leftover = tmp_path / "flowscale-loader-leftover"  # what a fetch wrote after its owner removed the cache
    (leftover / "ab").mkdir(parents=True)
    os.utime(leftover, (time.time() - 700, time.time() - 700))
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


def test_a_streamed_range_is_staged_batch_by_batch_whatever_the_pieces(tmp_path):
    """Record batches written to the cache as a GET's body arrives: each file holds exactly its batch's bytes,
    its CRC32 computed on the way, the bytes after the last batch (a shard's footer) dropped, whatever the
    sizes of the pieces the socket delivers; a new attempt starts clean."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    cache = BatchCache(str(tmp_path), "f" * 16)
    lengths = rng.integers(1, 5000, size=5)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    body = rng.integers(0, 256, size=int(lengths.sum()) + 300, dtype=np.uint8).tobytes()  # + a footer
    sink = cache.stager([(10 + k, int(o), int(n)) for k, (o, n) in enumerate(zip(offsets, lengths))])
    sink.begin()
    sink.write(body[:7000])  # a failed attempt: its files are removed by the next begin()
    sink.begin()
    # random cuts, and cuts exactly on the batches' boundaries and one byte either side of two of them
    cuts = np.unique(np.concatenate([rng.choice(np.arange(1, len(body)), size=20, replace=False), offsets[1:],
                                     offsets[2:4] - 1, offsets[2:4] + 1]))
    for piece in np.split(np.frombuffer(body, np.uint8), cuts):
        sink.write(piece.tobytes())
    staged = sink.finish()
    assert sorted(staged) == [10, 11, 12, 13, 14]
    assert len(list(tmp_path.rglob(".tmp-*"))) == 5
    for k, (o, n) in enumerate(zip(offsets, lengths)):
        want = body[o:o + n]
        assert staged[10 + k].buffer.to_pybytes() == want, f"batch {10 + k}, seed {seed}"
        assert staged[10 + k].crc32 == zlib.crc32(want), f"batch {10 + k}, seed {seed}"
    cache.put(12, staged[12])  # published by rename
    assert cache.get(12).to_pybytes() == body[offsets[2]:offsets[2] + lengths[2]]
    sink.discard()
    assert not list(tmp_path.rglob(".tmp-*"))


def test_an_object_that_ends_early_leaves_its_batches_short(tmp_path):
    cache = BatchCache(str(tmp_path), "f" * 16)
    sink = cache.stager([(0, 0, 100), (1, 100, 100), (2, 200, 100)])
    sink.begin()
    sink.write(b"a" * 150)  # the object ends inside batch 1
    staged = sink.finish()
    assert [len(staged[i]) for i in range(3)] == [100, 50, 0]


def test_a_body_cut_short_is_fetched_again_from_its_start(s3_bucket, s3_env):
    """A GET whose body the connection cuts half-way (the fault proxy's truncation) is retried whole, the
    sink told to start over; it ends up with exactly the range."""
    import s3fs

    from dataloaders import storage
    from tests.dataloaders.fault_proxy import FaultProxy

    data = np.random.default_rng().integers(0, 256, size=3 * storage.STREAM_PIECE + 123, dtype=np.uint8).tobytes()
    path = f"{s3_bucket.removeprefix('s3://')}/object"
    s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(path, data)

    class Recording:
        attempts, received = 0, b""

        def begin(self):
            self.attempts += 1
            self.received = b""

        def write(self, piece):
            self.received += piece

    with FaultProxy(s3_env, period=2, faults=("truncate",)) as proxy:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=proxy.url)
        fs.info(path)  # request 1; the GET is request 2, cut short; its retry, request 3, is whole
        sink = Recording()
        got = storage.stream_range(fs, path, 1000, len(data) + 50, path, retries=2, sink=sink)
        assert proxy.injected == {"truncate": 1}
    assert sink.attempts == 2 and sink.received == data[1000:] and got == len(data) - 1000


def test_a_sink_that_cannot_write_fails_the_read_at_once_naming_its_error(s3_bucket):
    """A full or unwritable cache disk is not a storage fault: no retry, and the sink's error, not a
    storage one, reaches the user."""
    import s3fs

    from dataloaders import storage

    path = f"{s3_bucket.removeprefix('s3://')}/object"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(path, b"x" * 1000)

    class Full:
        attempts = 0

        def begin(self):
            self.attempts += 1

        def write(self, piece):
            raise OSError(28, "No space left on device", "/cache/.tmp-entry")

    sink = Full()
    with pytest.raises(storage.SinkError, match="No space left on device.*/cache/.tmp-entry"):
        storage.stream_range(fs, path, 0, 1000, f"s3://{path}", retries=3, sink=sink)
    assert sink.attempts == 1


def test_cache_entries_streamed_through_storage_faults_are_whole_and_nothing_is_left_behind(s3_bucket, s3_env,
                                                                                          tmp_path):
    """Errors, resets, stalls and truncated bodies on a third of the GETs: every record batch ends up in the
    cache with its index's length and CRC32, and no temporary file or claim remains."""
    from dataloaders import storage
    from tests.dataloaders.fault_proxy import FaultProxy

    url = write_small(f"{s3_bucket}/ds", n=96, shard_rows=32, batch_rows=8)
    with FaultProxy(s3_env, period=3, stall_s=2.0) as proxy:
        options = {"endpoint_url": proxy.url}
        ds = open_dataset(url, storage_options=options, retries=8, timeout_s=1.0)
        index = ds.record_batches()
        cache = BatchCache(str(tmp_path / "node"), ds.manifest.fingerprint)
        reader = ShardReader(ds.manifest, index, options, retries=8, timeout_s=1.0, cache=cache)
        assert storage.can_stream(reader.fs)  # the bodies are staged as they arrive
        out = reader.read_batches(list(range(len(index))))
        assert sum(proxy.injected.values()) >= 2, proxy.injected
    assert sorted(out) == list(range(len(index))) and sorted(cache.entries()) == list(range(len(index)))
    for i in range(len(index)):
        entry = cache.get(i)
        assert len(entry) == index.length[i] and zlib.crc32(entry) == index.crc32[i], i
    assert not list(cache.dir.glob(".tmp-*")) and not list(cache.dir.glob(".claim-*"))


def test_a_fetch_that_fails_leaves_no_staged_file_and_no_claim(s3_bucket, tmp_path):
    import s3fs

    url = write_small(f"{s3_bucket}/ds", n=64, shard_rows=32, batch_rows=8)
    ds = open_dataset(url)
    cache = BatchCache(str(tmp_path / "node"), ds.manifest.fingerprint)
    reader = ShardReader(ds.manifest, ds.record_batches(), retries=0, cache=cache)
    s3fs.S3FileSystem(skip_instance_cache=True).rm(f"{ds.manifest.root}/{ds.manifest.shards[1].path}")
    with pytest.raises(StorageAccessError, match=ds.manifest.shards[1].path):
        reader.read_batches(list(range(len(ds.record_batches()))))  # shard 0's batches come in first
    assert not list(cache.dir.glob(".tmp-*")) and not list(cache.dir.glob(".claim-*"))


def test_entries_being_written_by_a_process_that_died_are_removed_when_the_cache_opens(tmp_path):
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    cache = BatchCache(str(tmp_path), "f" * 16)
    host = socket.gethostname()
    names = {"dead": f".tmp-{host}@{dead.pid}-00ff-000000003.arrow-batch",
             "dead, just written": f".tmp-{host}@{dead.pid}-00fe-000000004.arrow-batch",
             "alive": cache._temporary(3).name,
             "elsewhere": f".tmp-{host}-2@{dead.pid}-00ff-000000003.arrow-batch"}
    for name in names.values():
        (cache.dir / name).write_bytes(b"partial")
    old = time.time() - 200
    for name in ("dead", "alive", "elsewhere"):
        os.utime(cache.dir / names[name], (old, old))
    BatchCache(str(tmp_path), "f" * 16, stale_after_s=120)  # another process of the node opens it
    assert sorted(p.name for p in cache.dir.iterdir()) == sorted(
        [names["dead, just written"], names["alive"], names["elsewhere"]])


def test_a_corrupt_record_batch_from_s3_leaves_no_staged_copy_and_its_neighbours_are_cached(s3_bucket, tmp_path):
    import s3fs

    url = write_small(f"{s3_bucket}/ds", n=64, shard_rows=32, batch_rows=8)
    ds = open_dataset(url)
    index = ds.record_batches()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    shard = f"{ds.manifest.root}/{ds.manifest.shards[0].path}"
    data = bytearray(fs.cat_file(shard))
    data[int(index.offset[1] + index.length[1]) - 16] ^= 0x01  # record batch 1, in its last buffer
    fs.pipe_file(shard, bytes(data))
    cache = BatchCache(str(tmp_path / "node"), ds.manifest.fingerprint)
    out = ShardReader(ds.manifest, index, cache=cache).read_batches([0, 1, 2])
    assert isinstance(out[1], CorruptShardError) and "record batch 1" in str(out[1])
    assert out[0].columns["sample_id"].tolist() == list(range(8)) and sorted(cache.entries()) == [0, 2]
    assert not list(cache.dir.glob(".tmp-*")) and not list(cache.dir.glob(".claim-*"))


def test_a_staged_entry_over_the_whole_budget_is_dropped_not_published(tmp_path):
    cache = BatchCache(str(tmp_path), "f" * 16, max_bytes=100)
    sink = cache.stager([(7, 0, 200)])
    sink.begin()
    sink.write(b"y" * 200)
    cache.put(7, sink.finish()[7])
    assert cache.entries() == {} and not list(cache.dir.glob(".tmp-*"))


def test_a_get_cut_short_on_its_last_attempt_leaves_nothing_staged(s3_bucket, s3_env, tmp_path):
    from tests.dataloaders.fault_proxy import FaultProxy

    url = write_small(f"{s3_bucket}/ds", n=64, shard_rows=64, batch_rows=8)
    ds = open_dataset(url)
    cache = BatchCache(str(tmp_path / "node"), ds.manifest.fingerprint)
    with FaultProxy(s3_env, period=1, faults=("truncate",)) as proxy:  # every body cut in half
        reader = ShardReader(ds.manifest, ds.record_batches(), {"endpoint_url": proxy.url}, retries=0, cache=cache)
        with pytest.raises(StorageAccessError, match=ds.manifest.shards[0].path):
            reader.read_batches(list(range(8)))
        assert proxy.injected["truncate"] >= 1
    assert not list(cache.dir.glob(".tmp-*")) and not list(cache.dir.glob(".claim-*"))
