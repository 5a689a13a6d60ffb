"""What a rank reads, and its prefetch workers' loop: without torch, so that workers start light.

``RankPlan`` turns this rank's batch ``j`` into (record batch, row) pairs through the global order, and
``RankPlan.prefetch`` is the body of a loader worker process: it keeps the record batches of the coming
batches in the node cache. ``dataset.RankBatches`` adds the building of batches (torch tensors) in the
rank's process. ``fetch_units`` groups record batches into ranged GETs.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from dataloaders import storage
from dataloaders.cache import BatchCache
from dataloaders.manifest import Manifest
from dataloaders.sampler.order import GlobalOrder
from dataloaders.shards.index import RecordBatchIndex
from dataloaders.shards.reader import ShardReader

log = logging.getLogger(__name__)
_ENV_PREFIXES = ("AWS_", "FSSPEC_")


@dataclass
class ReadOptions:
    """How shards are read; travels (as plain data) to every worker process."""

    storage_options: dict = field(default_factory=dict)
    retries: int = 5
    timeout_s: float = storage.DEFAULT_TIMEOUT_S
    fetch_threads: int = 8
    cache_dir: str = ""
    cache_bytes: int = 0
    on_corrupt: str = "fail"
    verify_checksums: bool = True


@dataclass
class _Plan:
    position: int  # stream position of the batch's first sample (this rank's slice)
    batches: np.ndarray  # record batch of each sample
    rows: np.ndarray  # row in it


class RankPlan:
    """Which record batches this rank's batches need, from ``start`` on, and (``prefetch``) the body of its
    prefetch worker processes, which fetch those of the batches ahead into the node cache. Without torch,
    so that workers start without importing it (``dataset.RankBatches`` builds the batches).

    Picklable (plain data only), so worker processes can receive it; each builds its own filesystem.
    """

    def __init__(self, manifest: Manifest, index: RecordBatchIndex, order: GlobalOrder, read: ReadOptions, *,
                 rank: int, world_size: int, global_batch_size: int, start: int, lookahead: int,
                 node_partitions: list[int], own_lookahead: int | None = None):
        self.manifest = manifest
        self.index = index
        self.order = order
        self.read = read
        self.rank = rank
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // world_size
        self.start = start
        self.lookahead = lookahead  # batches planned ahead (by the prefetch workers when there are some)
        # batches the rank's process itself plans and fetches ahead once prefetch workers run (`running`): a
        # few, so that it fetches only what they have not got to; `lookahead` before and without them
        self.own_lookahead = lookahead if own_lookahead is None else own_lookahead
        self.running = None  # with workers: shared flag, set by the first worker that runs
        self.node_partitions = node_partitions  # whose record batches a bounded cache keeps first
        self.progress = None  # with workers: shared stream position of the batch the rank's process is building
        self._now = start
        # A forkserver's children inherit the server's environment, frozen when it started; hand workers the
        # parent's current credentials and endpoint instead.
        self.env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}

    def _position(self, j: int) -> int:
        return self.start + j * self.global_batch_size + self.rank * self.batch_size

    def _plan(self, j: int) -> _Plan:
        pos = self._position(j)
        _, batches, rows = self.order.locate(pos, self.batch_size)
        return _Plan(pos, batches, rows)

    def _reader(self) -> ShardReader:
        cache = None
        if self.read.cache_dir:
            cache = BatchCache(self.read.cache_dir, self.manifest.fingerprint, self.read.cache_bytes)
            cache.next_use = lambda ids: self.order.next_use(ids, self._current(), self.node_partitions)
        return ShardReader(self.manifest, self.index, self.read.storage_options, self.read.retries,
                           self.read.timeout_s, cache, self.read.verify_checksums)

    def _current(self) -> int:
        """The stream position of the batch the rank's process is building (its first, before it has one)."""
        return self._now if self.progress is None else max(self._position(0), int(self.progress.value))

    # ---------------------------------------------------------------------------- in a prefetch worker
    def prefetch(self, stop, counters, worker: int, parent: int) -> None:
        """Keep the record batches of the ``lookahead`` batches after the next ``own_lookahead`` ones of the
        rank's process in the node cache, in the order they will be needed, until ``stop.value`` is set or the
        rank's process is gone.

        The workers of a rank (and the other ranks of the node) share the work through the cache's claims:
        a record batch that is cached or claimed is skipped, so each is fetched once. A fetch that fails is
        left to the rank's process, which fetches the record batch itself and reports what is wrong.
        ``counters[2 * worker: 2 * worker + 2]`` count this worker's bytes and GETs from storage."""
        for key in [k for k in os.environ if k.startswith(_ENV_PREFIXES) and k not in self.env]:
            del os.environ[key]
        os.environ.update(self.env)
        reader = self._reader()
        pool = ThreadPoolExecutor(self.read.fetch_threads, thread_name_prefix="prefetch")
        self.running.value = 1
        handled: dict[int, int] = {}  # record batch -> the last planned batch that needs it
        inflight: set[Future] = set()
        queue: deque[list[int]] = deque()  # units to fetch, in the order of their first need
        next_j, seen_now, last_check = 0, -1, time.monotonic()
        chunk = max(1, self.lookahead // 4)
        try:
            while not stop.value:
                if time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    try:
                        os.kill(parent, 0)
                    except ProcessLookupError:
                        return  # the rank's process is gone
                if self.progress.value < 0:  # until the rank has its first batch, its fetches go first
                    time.sleep(0.01)
                    continue
                now = (self._current() - self._position(0)) // self.global_batch_size  # the batch being built
                # the next own_lookahead batches are the rank's process's to fetch (one GET per record batch
                # at the start, so that its first batch comes soon); the workers fetch the lookahead after them
                begin, end = now + self.own_lookahead, now + self.own_lookahead + self.lookahead
                if now != seen_now:
                    seen_now, next_j = now, max(next_j, begin)
                    for b in [b for b, j in handled.items() if j < now]:
                        del handled[b]  # passed: needed again only in a later block, planned again then
                if next_j <= end - chunk and len(queue) < self.read.fetch_threads:
                    fresh: dict[int, None] = {}  # topped up in chunks, as in _batches
                    while next_j < end:
                        for b in dict.fromkeys(self._plan(next_j).batches.tolist()):
                            if b not in handled:
                                fresh[b] = None
                            handled[b] = next_j
                        next_j += 1
                    queue.extend(fetch_units(self.index, list(fresh), reader.max_get_bytes))
                while queue and len(inflight) < self.read.fetch_threads:
                    unit = [b for b in queue.popleft() if b in handled]  # not what the rank has moved past
                    if unit:
                        inflight.add(pool.submit(reader.prefetch_batches, unit))
                if not inflight:
                    time.sleep(0.01)  # everything planned is fetched: wait for the rank's process to move on
                    continue
                done, inflight = wait(inflight, timeout=0.01, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.exception() is not None:
                        log.warning("loader prefetch worker %d: %s (the rank's process fetches it itself)",
                                    worker, future.exception())
                self._count(counters, worker, reader)
        finally:
            reader.close()
            pool.shutdown(wait=True, cancel_futures=True)
            self._count(counters, worker, reader)

    @staticmethod
    def _count(counters, worker: int, reader: ShardReader) -> None:
        taken = reader.take_counters()
        counters[2 * worker] += taken.get("bytes_fetched", 0)
        counters[2 * worker + 1] += taken.get("get_requests", 0)


def fetch_units(index: RecordBatchIndex, batches: list[int], max_bytes: int) -> list[list[int]]:
    """``batches`` (in the order they are first needed) grouped into runs of adjacent record batches of one
    shard, each run at most ``max_bytes`` (one ranged GET), in the order of each run's first need.

    Fewer, larger GETs: an object store spends per request (latency, and for some servers a pass over the
    whole object), while the record batches of a run are all needed within the same window anyway."""
    pending = set(batches)
    units = []
    for b in batches:
        if b not in pending:
            continue
        pending.discard(b)
        unit, size = [b], int(index.length[b])
        for step in (1, -1):  # grow forward, then backward, through batches of this shard still to fetch
            nxt = b + step
            while (nxt in pending and index.shard[nxt] == index.shard[b]
                   and size + int(index.length[nxt]) <= max_bytes):
                pending.discard(nxt)
                unit.append(nxt)
                size += int(index.length[nxt])
                nxt += step
        units.append(sorted(unit))
    return units


def opening_units(index: RecordBatchIndex, batches: list[int], later: set[int], max_bytes: int) -> list[list[int]]:
    """The GETs of a stream's first batch: each of its record batches (``batches``) on its own, so that it
    comes soon, except that one is grown to the nearer end of its shard when the record batches on that
    side are all needed ``later`` and come to at most ``max_bytes // 2``. What is left of that shard is then
    one run of adjacent batches (one GET, ``fetch_units``) instead of two on either side: one GET fewer
    per shard, for a first batch that waits for a little more."""
    units, taken = [], set(batches)
    for b in batches:
        first = b - int(index.batch[b])
        end = first
        while not index.last[end]:
            end += 1
        side = range(first, b) if b - first <= end - b else range(b + 1, end + 1)
        size = sum(int(index.length[i]) for i in side)
        if side and size <= max_bytes // 2 and all(i in later and i not in taken for i in side):
            taken.update(side)
            units.append(sorted([b, *side]))
        else:
            units.append([b])
    return units


def prefetch_worker(batches: RankPlan, stop, counters, worker: int, parent: int) -> None:
    batches.prefetch(stop, counters, worker, parent)


