"""The streaming loader: a dataset's global order, split across ranks and workers, with exact resume.

The contract:
- ``GlobalOrder`` (sampler/order.py) fixes the sample sequence from the dataset, the seed, the number of
  partitions ``P`` and ``G``; with ``P`` partitions every global batch takes ``G / P`` samples from each.
- Global batch ``i`` is stream positions ``[i*G, (i+1)*G)``; rank ``r`` of ``W`` takes the contiguous slice
  ``[i*G + r*B, i*G + (r+1)*B)`` with ``B = G // W``. Ranks are numbered node by node (as Ray Train and
  torchrun do), so node ``n`` of ``N`` takes slice ``[n*G/N, (n+1)*G/N)``: partitions ``[n*P/N, (n+1)*P/N)``
  when ``N`` divides ``P``, and it reads only their record batches.
- A rank builds all its batches in its own process. Its ``K`` loader workers only fetch ahead: they put
  the record batches of the coming batches into the node cache, where the rank's process maps them
  (``PrefetchStream``; the workers run ``plan.RankPlan.prefetch``, which does not import torch). So ``K``
  changes nothing either.
- The state is the number of samples the whole job has consumed (plus what identifies the order, ``P``
  included). It is the same on every rank, so a job resumed on another number of ranks or nodes, with the
  same ``G``, continues the same global sequence. ``P`` is fixed by the first run (``data.partitions``,
  default: its node count); a later run is efficient when its node count divides ``P``.

A lookahead of planned batches decides which record batches to fetch; a thread pool fetches them (one
ranged GET per run of adjacent batches of a shard, up to 64 MiB: ``fetch_units``) while earlier batches are
being used (S3 latency stays off the training step), and a record batch is released once no planned batch
needs it. With ``data.cache_dir`` the ranks and workers of a node share one cache (``cache.py``), so each
record batch is downloaded once per node; with workers and no ``cache_dir``, the rank and its workers share a
temporary one. Batches keep the stored dtypes (bf16 stays bf16); ``sample_id`` is int64 and ``caption`` a
list of str.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import torch

from dataloaders import storage
from dataloaders.cache import temporary_cache
from dataloaders.columns import ColumnSpec, empty_rows, to_torch
from dataloaders.errors import DataError, ManifestError
from dataloaders.manifest import Manifest, checksum_matches, manifest_url, parse_manifest
from dataloaders.plan import (  # noqa: F401 (re-exported)
    ReadOptions, RankPlan, _Plan, fetch_units, opening_units, prefetch_worker,
)
from dataloaders.sampler.order import GlobalOrder
from dataloaders.shards.index import RecordBatchIndex
from dataloaders.shards.reader import ShardReader

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 1: the whole-shard block shuffle before issue 14, whose order this one does not reproduce


def open_dataset(url: str, storage_options: dict | None = None, retries: int = 5,
                 timeout_s: float = storage.DEFAULT_TIMEOUT_S) -> "StreamingDataset":
    """Read and validate a dataset's manifest (``url`` is the dataset root or its manifest)."""
    if not url:
        raise ManifestError("no dataset URL given (set data.url to a dataset root or manifest URL)")
    murl = manifest_url(url)
    fs, path = storage.filesystem(murl, storage_options, timeout_s)
    try:
        text = storage.read_bytes(fs, path, murl, retries)
    except DataError as e:
        raise ManifestError(f"cannot read the manifest of dataset {url}: {e}") from e
    return StreamingDataset(parse_manifest(text, murl), storage_options or {})


class StreamingDataset:
    """An opened dataset: its manifest, and the loaders, empty condition and encoder that go with it."""

    def __init__(self, manifest: Manifest, storage_options: dict | None = None):
        self.manifest = manifest
        self.storage_options = storage_options or {}
        self._index: RecordBatchIndex | None = None

    def __len__(self) -> int:
        return self.manifest.num_samples

    def record_batches(self, read: ReadOptions | None = None) -> RecordBatchIndex:
        """The record-batch index (read once, verified against the manifest); for a dataset written without
        one, each shard as a single record batch."""
        if self._index is None:
            info = self.manifest.record_batch_index
            if info is None:
                self._index = RecordBatchIndex.of_whole_shards(self.manifest)
            else:
                read = read or ReadOptions(storage_options=self.storage_options)
                fs, root = storage.filesystem(self.manifest.root, read.storage_options, read.timeout_s)
                url = storage.join(self.manifest.root, info.path)
                data = storage.read_bytes(fs, storage.join(root, info.path), url, read.retries)
                if len(data) != info.bytes or not checksum_matches(data, info.checksum):
                    raise ManifestError(f"record-batch index {url} does not match manifest {self.manifest.url} (size "
                                        f"{len(data)}, expected {info.bytes} with {info.checksum}); rewrite the dataset")
                self._index = RecordBatchIndex.decode(data, self.manifest, url)
        return self._index

    def loader(self, *, rank: int, world_size: int, global_batch_size: int, seed: int, shuffle: bool = True,
               shuffle_block_size: int = 4096, num_workers: int = 0, prefetch: int = 4,
               read: ReadOptions | None = None, ranks_per_node: int | None = None,
               partitions: int | None = None) -> "StreamingLoader":
        """This rank's loader. ``ranks_per_node``: default ``$LOCAL_WORLD_SIZE`` (else one node);
        ``partitions``: default the node count, and a resumed state's value wins over the default."""
        read = read or ReadOptions(storage_options=self.storage_options)
        return StreamingLoader(self.manifest, self.record_batches(read), read, rank=rank, world_size=world_size,
                               global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                               shuffle_block_size=shuffle_block_size, partitions=partitions,
                               ranks_per_node=ranks_per_node, num_workers=num_workers, prefetch=prefetch)

    def empty_condition(self, read: ReadOptions | None = None) -> dict[str, torch.Tensor]:
        """The stored encoding of the empty caption: ``text_tokens`` (L, C), ``text_pooled`` (C,)."""
        info = self.manifest.empty_condition
        if info is None:
            raise ManifestError(f"dataset {self.manifest.url} stores no empty-caption encoding")
        specs = [ColumnSpec("text_tokens", "tensor", c.dtype, c.shape) if c.name == "text_tokens" else
                 ColumnSpec("text_pooled", "tensor", c.dtype, c.shape)
                 for c in self.manifest.columns if c.name in ("text_tokens", "text_pooled")]
        read = read or ReadOptions(storage_options=self.storage_options)
        reader = ShardReader(self.manifest, None, read.storage_options, read.retries, read.timeout_s)
        shard = reader.read(info, specs)
        return {s.name: to_torch(s, np.array(shard.columns[s.name][0])) for s in specs}


def empty_condition(source: str | StreamingDataset, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The encoding of the empty caption "" stored with a dataset (a URL or an opened dataset)."""
    ds = source if isinstance(source, StreamingDataset) else open_dataset(source, storage_options)
    return ds.empty_condition()


# --------------------------------------------------------------------------------------------------
# One rank's batches, built inside one worker
# --------------------------------------------------------------------------------------------------


class RankBatches(RankPlan):
    """This rank's batches from ``start`` on, built in the rank's process (what to read: ``RankPlan``)."""

    def plan(self) -> RankPlan:
        """The same plan without the batch-building part (what a prefetch worker receives)."""
        out = RankPlan.__new__(RankPlan)
        out.__dict__.update(self.__dict__)
        return out

    windows = 0  # how many times the rank's process has planned ahead: its first window, then each top-up

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = self._reader()
        pool = ThreadPoolExecutor(self.read.fetch_threads, thread_name_prefix="batch-fetch")
        # writes the first batch's record batches into the node cache once that batch has them
        publisher = ThreadPoolExecutor(1, thread_name_prefix="batch-publish")
        try:
            yield from self._batches(reader, pool, publisher)
        finally:
            reader.close()  # reads in flight stop retrying
            pool.shutdown(wait=False, cancel_futures=True)
            publisher.shutdown(wait=True)  # nothing claimed is left unpublished

    def _batches(self, reader: ShardReader, pool: ThreadPoolExecutor, publisher: ThreadPoolExecutor):
        resident: dict[int, Future] = {}  # record batch -> the fetch of its unit (adjacent batches of a shard)
        uses: Counter = Counter()  # record batch -> planned batches that still need it
        planned: deque[_Plan] = deque()
        bad: set[int] = set()
        next_j = 0
        # The window is topped up in chunks, so that the adjacent record batches of a shard that the new plans
        # need can be fetched with one GET. The first batch's record batches come about one per GET
        # (``opening_units``), submitted before the rest: the stream starts as soon as they are in.
        first = True
        while True:
            lookahead = self.own_lookahead if self.running is not None and self.running.value else self.lookahead
            chunk = max(1, lookahead // 4)
            if len(planned) <= lookahead - chunk or not planned:
                fresh: dict[int, None] = {}  # record batches to fetch, in first-use order
                opening: list[int] = []
                for _ in range(lookahead - len(planned)):
                    plan = self._plan(next_j)
                    next_j += 1
                    planned.append(plan)
                    needed = list(dict.fromkeys(plan.batches.tolist()))
                    uses.update(needed)
                    fresh.update(dict.fromkeys(b for b in needed if b not in resident))
                    if first:
                        opening, fresh, first = list(fresh), {}, False
                if opening:  # submitted first, and written to the cache after: the stream starts once they are in
                    units = opening_units(self.index, opening, set(fresh), reader.max_get_bytes)
                    for b in (b for unit in units for b in unit):
                        fresh.pop(b, None)
                    self._submit(units, resident, reader, pool, publisher)
                self._submit(fetch_units(self.index, list(fresh), reader.max_get_bytes), resident, reader, pool)
                self.windows += 1
            plan = planned.popleft()
            self._now = plan.position
            if self.progress is not None:
                self.progress.value = plan.position
            yield self._assemble(plan, resident, bad, reader)
            for b in set(plan.batches.tolist()):
                uses[b] -= 1
                if uses[b] == 0:
                    del uses[b]
                    del resident[b]

    @staticmethod
    def _submit(units: list[list[int]], resident: dict[int, Future], reader: ShardReader,
                pool: ThreadPoolExecutor, publish_with: ThreadPoolExecutor | None = None) -> None:
        for unit in units:
            future = pool.submit(reader.read_batches, unit, publish_with)
            resident.update(dict.fromkeys(unit, future))

    def _assemble(self, plan: _Plan, resident: dict[int, Future], bad: set[int], reader: ShardReader) -> dict[str, Any]:
        keep = np.ones(len(plan.batches), bool)
        decoded = {}
        skipped: Counter = Counter()
        for b in dict.fromkeys(plan.batches.tolist()):
            result = resident[b].result()[b]
            if isinstance(result, DataError):
                if self.read.on_corrupt != "skip":
                    raise result
                if b not in bad:
                    log.warning("skipping the samples of a bad record batch: %s", result)
                    bad.add(b)
                mask = plan.batches == b
                keep &= ~mask
                skipped[self.manifest.shards[int(self.index.shard[b])].path] += int(mask.sum())
                continue
            decoded[b] = result
        pairs = list(zip(plan.batches[keep].tolist(), plan.rows[keep].tolist()))
        batch: dict[str, Any] = {}
        for spec in self.manifest.columns:
            if spec.kind == "string":
                batch[spec.name] = [decoded[b].columns[spec.name][r] for b, r in pairs]
                continue
            tensor, out = empty_rows(spec, len(pairs))
            for k, (b, r) in enumerate(pairs):  # row by row: one copy each, no gathered temporary
                out[k] = decoded[b].columns[spec.name][r]
            batch[spec.name] = to_torch(spec, tensor)
        batch["_position"] = plan.position
        batch["_skipped"] = dict(skipped)
        batch["_io"] = dict(reader.take_counters())
        return batch


class PrefetchStream:
    """A rank's batches, built in its own process, with ``num_workers`` processes fetching ahead.

    The workers fetch the record batches of the next batches into the node cache (a temporary one for this
    stream when ``data.cache_dir`` is not set), the rank's process maps them from there and builds each
    batch as with ``num_workers=0``: no batch crosses a process boundary, and the sequence cannot depend on
    the workers. They start once the rank's process plans past its first window (the batches of a shuffle
    block, whose fetches it queued when it planned its first batch): they have nothing to take before that,
    and their start (a process each, imports, an S3 client: a CPU-second or more) would compete with its
    fetches and its first batch. Until they run, the rank's process fetches the record batches itself, later
    only those of its next ``data.prefetch`` batches that the workers have not got to.
    """

    def __init__(self, batches: RankBatches, num_workers: int, preload: list[str] = ()):
        self._temp = None
        if not batches.read.cache_dir:
            self._temp = temporary_cache()
            batches.read = replace(batches.read, cache_dir=self._temp, cache_bytes=self._budget(batches))
        context = worker_context(preload)
        batches.progress = context.RawValue("q", -1)  # -1: no batch built yet
        batches.running = self._running = context.RawValue("q", 0)
        self._counters = context.RawArray("q", 2 * num_workers)
        self._taken = [0, 0]
        # a plain shared flag: a multiprocessing Event's set() waits for every waiter, dead ones included
        self._stop = context.RawValue("b", 0)
        plan = batches.plan()
        self._procs = [context.Process(target=prefetch_worker, name=f"loader-prefetch-{w}", daemon=True,
                                       args=(plan, self._stop, self._counters, w, os.getpid()))
                       for w in range(num_workers)]
        self._batches = batches
        self._local: Iterator | None = iter(batches)
        self._starter: threading.Thread | None = None  # started once the rank plans past its first window

    @staticmethod
    def _budget(batches: RankBatches) -> int:
        """Bytes the temporary cache may hold: twice what the workers plan ahead, at least 256 MiB."""
        per_sample = float(batches.index.length.sum()) / max(1, int(batches.index.rows.sum()))
        return max(256 << 20, int(2 * batches.lookahead * batches.batch_size * per_sample))

    def _start(self) -> None:
        for proc in self._procs:
            if self._stop.value:
                return
            try:
                proc.start()  # the first start boots the forkserver
            except Exception as e:  # noqa: BLE001 - the rank's process fetches everything itself
                log.warning("loader prefetch worker did not start (%s); the rank's process fetches alone", e)
                return

    def __iter__(self) -> "PrefetchStream":
        return self

    @property
    def workers_started(self) -> bool:
        """Whether the worker processes have been asked to start (once the rank's process planned past its
        first window)."""
        return self._starter is not None

    @property
    def workers_running(self) -> bool:
        """Whether a worker has started fetching ahead (from then on the rank's process fetches little)."""
        return bool(self._running.value)

    def __next__(self) -> dict[str, Any]:
        batch = next(self._local)
        if self._starter is None and self._batches.windows > 1:
            self._starter = threading.Thread(target=self._start, name="loader-prefetch-start", daemon=True)
            self._starter.start()
        io = Counter(batch["_io"])
        io.update(self.take_io())
        batch["_io"] = dict(io)
        return batch

    def take_io(self) -> dict[str, int]:
        """The workers' bytes and GETs from storage since the last call."""
        total = [sum(self._counters[0::2]), sum(self._counters[1::2])]
        delta, self._taken = [t - s for t, s in zip(total, self._taken)], total
        return {"bytes_fetched": delta[0], "get_requests": delta[1]}

    def close(self) -> None:
        self._stop.value = 1
        if self._local is not None:
            self._local.close()
            self._local = None
        if self._starter is not None:
            self._starter.join()
        for proc in self._procs:
            if proc.pid is not None:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None


# --------------------------------------------------------------------------------------------------
# The loader the trainer holds
# --------------------------------------------------------------------------------------------------


class StreamingLoader:
    """Infinite iterable of this rank's batches, with ``state_dict``/``load_state_dict`` (JSON-able)."""

    def __init__(self, manifest: Manifest, index: RecordBatchIndex, read: ReadOptions, *, rank: int, world_size: int,
                 global_batch_size: int, seed: int, shuffle: bool = True, shuffle_block_size: int = 4096,
                 partitions: int | None = None, ranks_per_node: int | None = None, num_workers: int = 0,
                 prefetch: int = 4):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch_size % world_size:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not divisible by the {world_size} data-parallel "
                f"ranks; choose a global batch size that is a multiple of the rank count"
            )
        if read.on_corrupt not in ("fail", "skip"):
            raise ValueError(f"data.on_corrupt must be 'fail' or 'skip', got {read.on_corrupt!r}")
        self.manifest = manifest
        self.index = index
        self.read = read
        self.rank = rank
        self.world_size = world_size
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // world_size
        self.ranks_per_node = node_size(world_size, ranks_per_node)
        self.nodes = world_size // self.ranks_per_node
        self.node = rank // self.ranks_per_node
        self.partitions_fixed = partitions is not None  # else the node count, until a resumed state says otherwise
        self.order = GlobalOrder(index.rows, seed, shuffle, shuffle_block_size, batch_shards=index.shard,
                                 partitions=partitions or self.nodes, global_batch_size=global_batch_size)
        self._check_nodes_divide_partitions()
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.samples_seen = 0  # by the whole job, in the global stream
        self.skipped: Counter = Counter()  # shard path -> samples this rank skipped (on_corrupt=skip)
        # this rank's reads: bytes_fetched and get_requests (from storage), cache_hits, cache_waits, cache_checks
        self.io: Counter = Counter()
        self._live: Iterator | None = None
        self.stream: Iterator | None = None  # the live source: this process's batches, or a PrefetchStream

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    @property
    def epoch(self) -> int:
        """The epoch of the next sample to be yielded."""
        return self.samples_seen // self.order.num_samples

    @property
    def samples_seen_in_epoch(self) -> int:
        return self.samples_seen % self.order.num_samples

    def _lookahead(self) -> int:
        # Enough planned batches that every batch inside one shuffle block of a partition (block_size * P
        # stream positions) is planned at once: a record batch is then fetched once per block.
        per_block = math.ceil(self.order.block_size * self.order.partitions / self.global_batch_size)
        return max(1, self.prefetch, per_block + 1)

    def _source(self) -> Iterator[dict[str, Any]]:
        node_slice = self.node * self.ranks_per_node * self.batch_size
        batches = RankBatches(self.manifest, self.index, self.order, self.read, rank=self.rank,
                              world_size=self.world_size, global_batch_size=self.global_batch_size,
                              start=self.samples_seen, lookahead=self._lookahead(),
                              own_lookahead=max(1, self.prefetch) if self.num_workers else None,
                              node_partitions=self.order.partitions_of_slice(
                                  node_slice, node_slice + self.ranks_per_node * self.batch_size))
        if self.num_workers == 0:
            return iter(batches)
        fs, _ = storage.filesystem(self.manifest.root, self.read.storage_options, self.read.timeout_s)
        return PrefetchStream(batches, self.num_workers, preload=[type(fs).__module__])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()  # one live stream per loader; a new iter() continues from samples_seen
        self._live = self._iterate()
        return self._live

    def _iterate(self) -> Iterator[dict[str, Any]]:
        source = self.stream = self._source()
        try:
            for batch in source:
                expected = self.samples_seen + self.rank * self.batch_size
                position = int(batch.pop("_position"))
                if position != expected:
                    raise RuntimeError(f"loader order broken: batch at stream position {position}, expected {expected}")
                self.io.update(batch.pop("_io"))
                for path, n in dict(batch.pop("_skipped")).items():
                    self.skipped[path] += n
                    log.warning("dataset %s: skipped %d samples of shard %s (%d skipped in total)",
                                self.manifest.url, n, path, sum(self.skipped.values()))
                self.samples_seen += self.global_batch_size
                yield batch
        finally:
            source.close()  # stop the fetch threads, and the worker processes if any
            if isinstance(source, PrefetchStream):
                self.io.update(source.take_io())  # what the workers fetched after the last batch

    def close(self) -> None:
        """Stop the live stream and its worker processes (iteration can start again afterwards)."""
        if self._live is not None:
            self._live.close()
            self._live = None

    # -------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state; identical on every rank (samples consumed by the whole job)."""
        return {
            "version": STATE_VERSION,
            "samples_seen": self.samples_seen,
            "epoch": self.epoch,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.order.num_samples,
            "seed": self.order.seed,
            "shuffle": self.order.shuffle,
            "shuffle_block_size": self.order.block_size,
            "partitions": self.order.partitions,
            "order_base": self.order.base,
            "dataset": self.manifest.fingerprint,
            "skipped_samples": int(sum(self.skipped.values())),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; any world size, node count and worker count, same order settings."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION} (version 1 is the "
                             f"order before record-batch reads, which this loader does not reproduce)")
        mine = self.state_dict()
        checks = [("dataset", "dataset (manifest fingerprint)"), ("seed", "train.seed"), ("shuffle", "data.shuffle"),
                  ("shuffle_block_size", "data.shuffle_block_size")]
        if self.partitions_fixed:
            checks.append(("partitions", "data.partitions"))
        for key, what in checks:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume the data order of dataset {self.manifest.url}: the checkpoint's {what} is "
                    f"{state.get(key)!r}, this job's is {mine[key]!r}; resuming would repeat or skip samples"
                )
        seen, partitions, base = int(state["samples_seen"]), int(state["partitions"]), int(state["order_base"])
        if partitions > 1 and seen % partitions:
            raise ValueError(f"cannot resume: {seen} samples seen is not a multiple of the {partitions} partitions")
        if partitions > 1 and state["global_batch_size"] != self.global_batch_size:
            log.warning("resuming with global batch %d after %d samples (checkpoint batch %d): every partition "
                        "continues where it was, in chunks of another size", self.global_batch_size, seen,
                        state["global_batch_size"])
            base = seen  # the rounds of the new G start here
        elif seen % self.global_batch_size:
            log.warning("resuming with global batch %d after %d samples (checkpoint batch %d): same order, but "
                        "batch boundaries move", self.global_batch_size, seen, state["global_batch_size"])
        self.close()
        self.order = self.order.with_batch(self.global_batch_size, base if partitions > 1 else 0, partitions)
        self.samples_seen = seen
        self._check_nodes_divide_partitions()

    def _check_nodes_divide_partitions(self) -> None:
        if self.order.partitions % self.nodes:
            log.warning("the data order has %d partitions, which %d nodes do not divide: each node will read more "
                        "than its share (choose a node count that divides %d)", self.order.partitions, self.nodes,
                        self.order.partitions)


def node_size(world_size: int, ranks_per_node: int | None) -> int:
    """Ranks per node: as given, else ``$LOCAL_WORLD_SIZE`` (Ray Train and torchrun set it), else all ranks."""
    if ranks_per_node is not None:
        if ranks_per_node < 1 or world_size % ranks_per_node:
            raise ValueError(f"ranks_per_node={ranks_per_node} does not divide the {world_size} ranks")
        return ranks_per_node
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) >= 1 and world_size % int(local) == 0:
        return int(local)
    if local:
        log.warning("LOCAL_WORLD_SIZE=%s does not divide the %d ranks; the loader treats them as one node",
                    local, world_size)
    return world_size


def worker_context(preload: list[str] | tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """Where loader workers come from: a forkserver that has imported the prefetch loop (``plan.py``, which
    does not import torch) and ``preload`` (the dataset's filesystem implementation, e.g. s3fs) once; the
    first call in a process starts it.

    Not plain fork: s3fs/aiobotocore event loops and sockets do not survive a fork (s3fs #914). The
    forkserver is a clean single-threaded process, so forking it is safe, and it saves every new worker the
    imports. Workers build their own filesystem on first use.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dataloaders.plan", *preload])
    return ctx


def build_loader(cfg, *, rank: int, world_size: int, global_batch_size: int, seed: int,
                 ranks_per_node: int | None = None) -> StreamingLoader:
    """The training loader for ``cfg`` (an ``infra.config.DataConfig``); ``ranks_per_node`` as in ``node_size``."""
    url = cfg.url
    if not url:
        raise ValueError("data.url is empty: give the dataset's manifest URL (the job driver fills in the digits "
                         "demo when none is given)")
    read = ReadOptions(storage_options=dict(cfg.storage_options), retries=cfg.retries, timeout_s=cfg.timeout_s,
                       fetch_threads=cfg.fetch_threads, cache_dir=cfg.cache_dir, cache_bytes=cfg.cache_bytes,
                       on_corrupt=cfg.on_corrupt, verify_checksums=cfg.verify_checksums)
    ds = open_dataset(url, read.storage_options, read.retries, read.timeout_s)
    check_shapes(ds.manifest, cfg)
    return ds.loader(rank=rank, world_size=world_size, global_batch_size=global_batch_size, seed=seed,
                     shuffle=cfg.shuffle, shuffle_block_size=cfg.shuffle_block_size, num_workers=cfg.num_workers,
                     prefetch=cfg.prefetch, read=read, ranks_per_node=ranks_per_node,
                     partitions=cfg.partitions or None)


def check_shapes(manifest: Manifest, cfg) -> None:
    """The dataset must hold what the config promises the model (latent side, text length)."""
    latent = manifest.column("latent").shape
    tokens = manifest.column("text_tokens").shape
    if latent[-1] != cfg.latent_size or latent[-2] != cfg.latent_size:
        raise ValueError(f"dataset {manifest.url} has latents of shape {list(latent)}, but data.latent_size="
                         f"{cfg.latent_size}")
    if tokens[0] != cfg.text_tokens:
        raise ValueError(f"dataset {manifest.url} has {tokens[0]} text tokens per sample, but data.text_tokens="
                         f"{cfg.text_tokens}")
