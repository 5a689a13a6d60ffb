"""Fetch record batches, prove each is the one the index describes, and decode it without copies.

With a record-batch index (``shards/index.py``) a reader fetches only the batches it needs: the ranges of
the batches asked for together are coalesced where they touch (``fsspec.utils.merge_offset_ranges``, up to
``MAX_GET_BYTES`` per GET) and fetched with ranged GETs. Each batch's length and CRC32 are checked against
the index, and it is decoded on its own (``pyarrow.ipc.read_message`` + ``read_record_batch`` with the
manifest's schema). The GET for a shard's last batch runs to the end of the object, so a truncated upload
is caught even where only the footer is missing. Without an index (datasets written before it) every
shard is one "record batch": fetched whole, checked against the manifest's size and checksum.

A mismatch is retried once from storage (the copy in flight, or in the cache, may be the bad one). If it
persists, the whole shard is fetched once to say what is wrong: a shard whose columns differ from the
manifest raises ``SchemaMismatchError``, anything else ``CorruptShardError``, naming the shard URL and the
batch index. Such an error is returned for that batch only, so its neighbours still read and the loader's
``on_corrupt`` policy decides. Decoded columns are numpy views of the fetched (or memory-mapped) buffer.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
from fsspec.utils import merge_offset_ranges

from dataloaders import storage
from dataloaders.cache import BatchCache, Staged
from dataloaders.columns import ColumnSpec, column_numpy, schema_of
from dataloaders.errors import CorruptShardError, DataError, SchemaMismatchError
from dataloaders.manifest import Manifest, ShardInfo, checksum_matches
from dataloaders.shards.index import RecordBatchIndex

log = logging.getLogger(__name__)
MAX_GET_BYTES = 64 << 20  # coalesce adjacent record batches up to this many bytes per GET


@dataclass
class DecodedBatch:
    columns: dict[str, np.ndarray | list[str]]  # name -> (rows, *shape) in storage dtype, or strings


class ShardReader:
    """Reads the record batches of one dataset in one process (it owns that process's filesystem)."""

    def __init__(self, manifest: Manifest, index: RecordBatchIndex | None = None, storage_options: dict | None = None,
                 retries: int = 5, timeout_s: float = storage.DEFAULT_TIMEOUT_S, cache: BatchCache | None = None,
                 verify: bool = True):
        self.manifest = manifest
        self.index = index if index is not None else RecordBatchIndex.of_whole_shards(manifest)
        self.schema = schema_of(manifest.columns)
        self.fs, self.root = storage.filesystem(manifest.root, storage_options, timeout_s)
        self.retries = retries
        self.cache = cache
        self.verify = verify
        self.max_get_bytes = MAX_GET_BYTES
        # bytes and GETs from storage, record batches served by the cache (own or waited for)
        self.counters: Counter = Counter()
        self._lock = threading.Lock()
        self.closed = threading.Event()  # set by close(): reads in flight stop retrying

    def close(self) -> None:
        """Stop retrying: a read still failing gives up at its next retry instead of running out its budget
        (the fetch threads of a closed loader would otherwise keep calling a failing store for seconds)."""
        self.closed.set()

    def url_of(self, info: ShardInfo) -> str:
        return storage.join(self.manifest.root, info.path)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self.counters.update(deltas)

    def take_counters(self) -> Counter:
        """The counters since the last call (and reset them)."""
        with self._lock:
            out, self.counters = self.counters, Counter()
        return out

    # ------------------------------------------------------------------------------------ record batches
    def read_batches(self, ids: Sequence[int], publish_with: Executor | None = None
                     ) -> dict[int, DecodedBatch | DataError]:
        """Fetch, verify and decode record batches (ids into the index), through the node cache if any.
        A batch that stays corrupt maps to its error; storage failures raise. With ``publish_with``, what
        this call fetched is put in the cache by a task of that executor, its claims held until then: the
        caller has the batches without waiting for the writes (a stream's first batch)."""
        found: dict[int, bytes | pa.Buffer | Staged | DataError] = {}
        missing = []
        for i in ids:
            data = self.cache.get(i) if self.cache else None
            if data is not None and self._cached_ok(i, data):
                found[i] = data
                self._count(cache_hits=1)
            else:
                if data is not None:
                    log.warning("cached copy of %s is bad; fetching it again", self._where(i))
                    self.cache.discard(i)
                missing.append(i)
        mine = [i for i in missing if self.cache.claim(i)] if self.cache else missing
        theirs = [i for i in missing if i not in set(mine)]
        found.update(self._fetch_claimed(mine, publish_with))
        for i in theirs:
            data = self.cache.wait(i)
            if data is not None and self._cached_ok(i, data):
                found[i] = data
                self._count(cache_waits=1)
            else:  # its claimant gave up or died: fetch it here (and share it if it is good)
                found.update(self._fetch_verified([i]))
                if not isinstance(found[i], DataError):
                    self.cache.put(i, found[i])
        return {i: found[i] if isinstance(found[i], DataError) else self._decode(i, found[i]) for i in ids}

    def prefetch_batches(self, ids: Sequence[int]) -> None:
        """Put the record batches ``ids`` into the cache, except those already there or claimed by another
        process; nothing is decoded. A batch that stays corrupt is left out (its claim released): a reader
        that needs it fetches it and reports it. Storage failures raise, claims released."""
        self._fetch_claimed([i for i in ids if not self.cache.has(i) and self.cache.claim(i)])

    def _fetch_claimed(self, ids: list[int], publish_with: Executor | None = None
                       ) -> dict[int, bytes | pa.Buffer | Staged | DataError]:
        """Fetch and verify ``ids`` (claimed in the cache, if any): the good ones are put in the cache (by a
        task of ``publish_with``, if given), every other claim is released, also when the fetch raises."""
        try:
            found = self._fetch_verified(ids)
        except BaseException:
            self._publish(ids, {})
            raise
        if publish_with is not None and self.cache is not None:
            try:
                publish_with.submit(self._publish, ids, found)
                return found
            except RuntimeError:  # its executor is shut down (the stream closed meanwhile): publish here
                pass
        self._publish(ids, found)
        return found

    def _publish(self, ids: list[int], found: dict[int, bytes | pa.Buffer | Staged | DataError]) -> None:
        """Put the good ones of ``ids`` in the cache and release the claims of the others."""
        if self.cache is None:
            return
        for i in ids:
            if isinstance(found.get(i), DataError) or i not in found:
                self.cache.release(i)
            else:
                self.cache.put(i, found[i])

    def _fetch_verified(self, ids: list[int]) -> dict[int, bytes | pa.Buffer | Staged | DataError]:
        out: dict[int, bytes | pa.Buffer | Staged | DataError] = {}
        first = self._fetch(ids)
        try:
            for i in ids:
                data, short = first[i]
                problem = self._problem(i, data, short)
                if problem is not None:
                    log.warning("%s: %s; fetching it again", self._where(i), problem)
                    BatchCache.unstage(data)
                    data, short = self._fetch([i])[i]
                    problem = self._problem(i, data, short)
                    if problem is not None:
                        BatchCache.unstage(data)
                out[i] = data if problem is None else self._diagnose(i, problem)
        except BaseException:  # nothing staged is left behind
            for data in (*(d for d, _ in first.values()), *out.values()):
                BatchCache.unstage(data)
            raise
        return out

    def _fetch(self, ids: list[int]) -> dict[int, tuple[bytes | pa.Buffer | Staged, bool]]:
        """Each batch's bytes from storage, and whether its shard's object ended early."""
        ix = self.index
        if not ids:
            return {}
        if ix.whole_shards:
            out = {}
            for i in ids:
                info = self.manifest.shards[int(ix.shard[i])]
                data = storage.read_buffer(self.fs, storage.join(self.root, info.path), self.url_of(info),
                                           self.retries, self.closed)
                self._count(bytes_fetched=len(data), get_requests=1)
                out[i] = (data, False)
            return out
        ids = sorted(ids, key=lambda i: (ix.shard[i], ix.offset[i]))
        paths = [self.manifest.shards[int(ix.shard[i])].path for i in ids]
        starts = [int(ix.offset[i]) for i in ids]
        # The last batch of a shard is read to the object's end, so that a truncated object shows.
        ends = [self.manifest.shards[int(ix.shard[i])].bytes if ix.last[i] else int(ix.offset[i] + ix.length[i])
                for i in ids]
        out: dict[int, tuple[pa.Buffer | Staged, bool]] = {}
        merged = merge_offset_ranges(paths, starts, ends, max_gap=0, max_block=self.max_get_bytes)
        # With a node cache on an object store, each GET's body is written to the cache's files as it
        # arrives and mapped from there: no buffer of the whole range (up to ``max_get_bytes``) is built.
        stage = self.cache is not None and storage.can_stream(self.fs)
        try:
            for path, start, end in zip(*merged):
                members = [(i, s) for i, p, s in zip(ids, paths, starts) if p == path and start <= s < end]
                where = (self.fs, storage.join(self.root, path), start, end, storage.join(self.manifest.root, path))
                if stage:
                    sink = self.cache.stager([(i, s - start, int(ix.length[i])) for i, s in members])
                    try:
                        got = storage.stream_range(*where, self.retries, sink, self.closed)
                        pieces = sink.finish()
                    except BaseException:
                        sink.discard()
                        raise
                else:
                    blob = storage.read_range(*where, self.retries, self.closed)
                    got, buffer = len(blob), blob if isinstance(blob, pa.Buffer) else pa.py_buffer(blob)
                    pieces = {i: buffer[s - start:s - start + int(ix.length[i])] for i, s in members}
                self._count(bytes_fetched=got, get_requests=1)
                for i, _ in members:
                    out[i] = (pieces[i], bool(ix.last[i]) and got < end - start)
        except BaseException:
            for data, _ in out.values():
                BatchCache.unstage(data)
            raise
        return out

    def _cached_ok(self, i: int, data: pa.Buffer) -> bool:
        """A cached entry is good: its length always, its checksum if it predates this run's cache."""
        if self.cache.trusted(i):
            return len(data) == self.index.length[i]
        if self._problem(i, data, short=False) is not None:
            return False
        self._count(cache_checks=1)
        self.cache.vouch(i)
        return True

    def _where(self, i: int) -> str:
        info = self.manifest.shards[int(self.index.shard[i])]
        if self.index.whole_shards:
            return f"shard {self.url_of(info)}"
        return f"shard {self.url_of(info)} record batch {int(self.index.batch[i])}"

    def _problem(self, i: int, data: bytes | pa.Buffer | Staged, short: bool) -> str | None:
        ix = self.index
        info = self.manifest.shards[int(ix.shard[i])]
        if ix.whole_shards:
            if len(data) != info.bytes:
                return f"{len(data)} bytes, the manifest says {info.bytes} (truncated or replaced)"
            if self.verify and not checksum_matches(data, info.checksum):
                return f"checksum differs from the manifest's {info.checksum} (bit rot or a replaced object)"
            return None
        if len(data) != ix.length[i] or short:
            return (f"record batch {int(ix.batch[i])} ({len(data)} of its {int(ix.length[i])} bytes; the object is "
                    f"shorter than the manifest's {info.bytes}): truncated or replaced")
        if self.verify and (data.crc32 if isinstance(data, Staged) else zlib.crc32(data)) != ix.crc32[i]:
            return (f"checksum differs from the index's crc32:{int(ix.crc32[i]):08x} in record batch "
                    f"{int(ix.batch[i])} (bit rot or a replaced object)")
        return None

    def _diagnose(self, i: int, problem: str) -> DataError:
        """The error for a batch that stayed bad: a schema mismatch if the whole shard shows one."""
        info = self.manifest.shards[int(self.index.shard[i])]
        url = self.url_of(info)
        if not self.index.whole_shards:
            try:
                whole = storage.read_buffer(self.fs, storage.join(self.root, info.path), url, self.retries,
                                            self.closed)
                check_schema(pa.ipc.open_file(pa.py_buffer(whole) if isinstance(whole, bytes) else whole).schema,
                             self.manifest.columns, url)
            except SchemaMismatchError as e:
                return e
            except (pa.ArrowInvalid, DataError):
                pass
        rows = int(self.index.rows[i])
        return CorruptShardError(f"shard {url} is corrupt: {problem}; rewrite the dataset or set "
                                 f"data.on_corrupt=skip to skip its {rows} samples")

    def _decode(self, i: int, data: bytes | pa.Buffer | Staged) -> DecodedBatch | DataError:
        ix = self.index
        info = self.manifest.shards[int(ix.shard[i])]
        url = self.url_of(info)
        data = data.buffer if isinstance(data, Staged) else data
        buffer = pa.py_buffer(data) if isinstance(data, bytes) else data
        try:
            if ix.whole_shards:
                return decode(buffer, info, self.manifest.columns, url)
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(buffer), self.schema)
        except pa.ArrowInvalid as e:
            return self._diagnose(i, f"record batch {int(ix.batch[i])} is not a readable Arrow IPC message ({e})")
        except DataError as e:
            return e
        if batch.num_rows != ix.rows[i]:
            return self._diagnose(i, f"record batch {int(ix.batch[i])} has {batch.num_rows} rows, the index says "
                                     f"{int(ix.rows[i])}")
        return DecodedBatch({s.name: column_numpy(s, batch.column(k)) for k, s in enumerate(self.manifest.columns)})

    # ------------------------------------------------------------------------------------ whole files
    def read(self, info: ShardInfo, specs: list[ColumnSpec] | None = None) -> DecodedBatch:
        """Fetch, verify and decode a whole Arrow file (the empty condition); ``specs`` default: the manifest's."""
        url = self.url_of(info)
        for attempt in range(2):
            data = storage.read_buffer(self.fs, storage.join(self.root, info.path), url, self.retries,
                                       self.closed)
            self._count(bytes_fetched=len(data), get_requests=1)
            problem = (f"{len(data)} bytes, the manifest says {info.bytes} (truncated or replaced)"
                       if len(data) != info.bytes else
                       "checksum differs from the manifest's" if self.verify and not checksum_matches(data, info.checksum)
                       else None)
            if problem is None:
                return decode(data, info, self.manifest.columns if specs is None else specs, url)
            log.warning("%s: %s (attempt %d)", url, problem, attempt + 1)
        raise CorruptShardError(f"file {url} is corrupt: {problem}")


def decode(data: bytes | pa.Buffer, info: ShardInfo, specs: list[ColumnSpec], url: str) -> DecodedBatch:
    """A whole Arrow IPC file (all its record batches) as columns, checked against ``specs``."""
    try:
        table = pa.ipc.open_file(data if isinstance(data, pa.Buffer) else pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as e:
        raise CorruptShardError(f"shard {url} is not a readable Arrow IPC file: {e}") from None
    if table.num_rows != info.rows:
        raise CorruptShardError(f"shard {url} has {table.num_rows} rows, the manifest says {info.rows}")
    check_schema(table.schema, specs, url)
    return DecodedBatch({spec.name: column_numpy(spec, table.column(spec.name)) for spec in specs})


def check_schema(schema: pa.Schema, specs: list[ColumnSpec], url: str) -> None:
    """Every column of ``specs`` is in ``schema`` with the manifest's type and metadata."""
    for spec in specs:
        if spec.name not in schema.names:
            raise SchemaMismatchError(f"shard {url} lacks column '{spec.name}' (it has {schema.names})")
        want = spec.arrow_field()
        got = schema.field(spec.name)
        if got.type != want.type or (got.metadata or {}).get(b"flowscale") != want.metadata[b"flowscale"]:
            raise SchemaMismatchError(
                f"shard {url} column '{spec.name}' is {got.type} {_describe(got)}, the manifest says "
                f"{spec.kind} {spec.dtype}{list(spec.shape)}"
            )


def _describe(field: pa.Field) -> str:
    meta = (field.metadata or {}).get(b"flowscale")
    return meta.decode() if meta else "(no column metadata)"
