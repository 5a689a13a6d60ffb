"""Fetch a shard, prove it is the one the manifest describes, and decode it without copies.

A shard is fetched whole (one GET), so its size and checksum can be checked against the manifest before a
single row is used: a truncated upload, a flipped bit or a stale object is caught here, not in the loss
curve. A mismatch is retried once from storage (the copy in flight, or in the local cache, may be the bad
one) before the shard is declared corrupt. The decoded columns are numpy views of the fetched buffer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dataloaders import storage
from dataloaders.cache import ShardCache
from dataloaders.columns import ColumnSpec, column_numpy
from dataloaders.errors import CorruptShardError, SchemaMismatchError
from dataloaders.manifest import Manifest, ShardInfo, checksum_matches

log = logging.getLogger(__name__)


@dataclass
class DecodedShard:
    info: ShardInfo
    columns: dict[str, np.ndarray | list[str]]  # name -> (rows, *shape) in storage dtype, or strings

    @property
    def nbytes(self) -> int:
        return self.info.bytes


class ShardReader:
    """Reads the shards of one dataset in one process (it owns that process's filesystem)."""

    def __init__(self, manifest: Manifest, storage_options: dict | None = None, retries: int = 5,
                 timeout_s: float = storage.DEFAULT_TIMEOUT_S, cache: ShardCache | None = None,
                 verify: bool = True):
        self.manifest = manifest
        self.fs, self.root = storage.filesystem(manifest.root, storage_options, timeout_s)
        self.retries = retries
        self.cache = cache
        self.verify = verify
        self.bytes_fetched = 0  # from storage, not from the cache

    def url_of(self, info: ShardInfo) -> str:
        return storage.join(self.manifest.root, info.path)

    def fetch(self, info: ShardInfo) -> bytes | pa.Buffer:
        """The verified bytes of a shard, from the cache when it holds a good copy."""
        url = self.url_of(info)
        data = self.cache.get(info.path) if self.cache else None
        from_cache = data is not None
        for attempt in range(2):
            if data is None:
                data = storage.read_buffer(self.fs, storage.join(self.root, info.path), url, self.retries)
                self.bytes_fetched += len(data)
                from_cache = False
            problem = self._check(info, data)
            if problem is None:
                if self.cache is not None and not from_cache:
                    self.cache.put(info.path, data)
                return data
            log.warning("shard %s: %s (%s); fetching it again", url, problem, "cached copy" if from_cache else
                        f"attempt {attempt + 1}")
            data = None
        raise CorruptShardError(f"shard {url} is corrupt: {problem}; rewrite the dataset or set "
                                f"data.on_corrupt=skip to skip its {info.rows} samples")

    def _check(self, info: ShardInfo, data: bytes | pa.Buffer) -> str | None:
        if len(data) != info.bytes:
            return f"{len(data)} bytes, the manifest says {info.bytes} (truncated or replaced)"
        if self.verify and not checksum_matches(data, info.checksum):
            return f"checksum differs from the manifest's {info.checksum} (bit rot or a replaced object)"
        return None

    def read(self, info: ShardInfo, specs: list[ColumnSpec] | None = None) -> DecodedShard:
        """Fetch, verify and decode a shard; columns checked against ``specs`` (default: the manifest's)."""
        specs = self.manifest.columns if specs is None else specs
        data = self.fetch(info)
        return decode(data, info, specs, self.url_of(info))


def decode(data: bytes | pa.Buffer, info: ShardInfo, specs: list[ColumnSpec], url: str) -> DecodedShard:
    try:
        table = pa.ipc.open_file(data if isinstance(data, pa.Buffer) else pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as e:
        raise CorruptShardError(f"shard {url} is not a readable Arrow IPC file: {e}") from None
    if table.num_rows != info.rows:
        raise CorruptShardError(f"shard {url} has {table.num_rows} rows, the manifest says {info.rows}")
    columns = {}
    for spec in specs:
        if spec.name not in table.column_names:
            raise SchemaMismatchError(f"shard {url} lacks column '{spec.name}' (it has {table.column_names})")
        want = spec.arrow_field()
        got = table.schema.field(spec.name)
        if got.type != want.type or (got.metadata or {}).get(b"flowscale") != want.metadata[b"flowscale"]:
            raise SchemaMismatchError(
                f"shard {url} column '{spec.name}' is {got.type} {_describe(got)}, the manifest says "
                f"{spec.kind} {spec.dtype}{list(spec.shape)}"
            )
        columns[spec.name] = column_numpy(spec, table.column(spec.name))
    return DecodedShard(info, columns)


def _describe(field: pa.Field) -> str:
    meta = (field.metadata or {}).get(b"flowscale")
    return meta.decode() if meta else "(no column metadata)"
