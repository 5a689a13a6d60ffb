"""The record-batch index: where each record batch of each shard lies, and its checksum.

A shard is an Arrow IPC file of several record batches. The writer records each batch's byte range (the
encapsulated IPC message: metadata and body) and its CRC32 in one small binary file next to the manifest,
an Arrow IPC file with one row per record batch (about 24 bytes each; a JSON list would reach tens of MB
at 10M samples). The manifest points at it with its size and checksum, so the manifest's fingerprint
covers it. A reader then fetches just the record batches it needs with ranged GETs, verifies each and
decodes it alone (``pyarrow.ipc.read_message`` + ``read_record_batch`` with the manifest's schema).

A dataset written before the index existed has none; there every shard counts as one record batch that
spans the whole file and is verified with the manifest's whole-shard checksum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dataloaders.errors import ManifestError
from dataloaders.manifest import Manifest

SCHEMA = pa.schema([("shard", pa.int32()), ("offset", pa.int64()), ("length", pa.int64()), ("rows", pa.int64()),
                    ("crc32", pa.uint32())])


@dataclass(frozen=True)
class BatchRange:
    """One record batch as the writer laid it out in its shard."""

    offset: int
    length: int
    rows: int
    crc32: int


@dataclass
class RecordBatchIndex:
    shard: np.ndarray  # (B,) shard of each record batch; a shard's batches are consecutive, in file order
    batch: np.ndarray  # (B,) index of the batch inside its shard
    offset: np.ndarray  # (B,) byte offset of its IPC message in the shard
    length: np.ndarray  # (B,) bytes of the message
    rows: np.ndarray  # (B,)
    crc32: np.ndarray | None  # (B,) uint32; None: whole shards, checked against the manifest's checksum
    last: np.ndarray  # (B,) bool: the shard's last record batch

    @property
    def whole_shards(self) -> bool:
        return self.crc32 is None

    def __len__(self) -> int:
        return len(self.shard)

    @classmethod
    def of_whole_shards(cls, manifest: Manifest) -> "RecordBatchIndex":
        n = len(manifest.shards)
        return cls(np.arange(n), np.zeros(n, np.int64), np.zeros(n, np.int64),
                   np.array([s.bytes for s in manifest.shards], np.int64),
                   np.array([s.rows for s in manifest.shards], np.int64), None, np.ones(n, bool))

    @classmethod
    def decode(cls, data: bytes | pa.Buffer, manifest: Manifest, url: str) -> "RecordBatchIndex":
        """Parse and check an index against its manifest (rows per shard, ranges inside each shard)."""
        try:
            table = pa.ipc.open_file(pa.py_buffer(data) if isinstance(data, bytes) else data).read_all()
        except pa.ArrowInvalid as e:
            raise ManifestError(f"record-batch index {url} is not a readable Arrow IPC file: {e}") from None
        if not table.schema.equals(SCHEMA):
            raise ManifestError(f"record-batch index {url} has columns {table.schema}, expected {SCHEMA}")
        col = {name: table.column(name).to_numpy() for name in SCHEMA.names}
        shard = col["shard"].astype(np.int64)
        if len(shard) == 0 or np.any(np.diff(shard) < 0) or shard[0] != 0 or shard[-1] != len(manifest.shards) - 1:
            raise ManifestError(f"record-batch index {url} does not list the shards of manifest {manifest.url} in order")
        first = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
        last = np.zeros(len(shard), bool)
        last[np.r_[first[1:] - 1, len(shard) - 1]] = True
        batch = np.arange(len(shard)) - np.repeat(first, np.diff(np.r_[first, len(shard)]))
        index = cls(shard, batch, col["offset"], col["length"], col["rows"], col["crc32"], last)
        rows = np.bincount(shard, weights=index.rows, minlength=len(manifest.shards))
        sizes = np.array([s.bytes for s in manifest.shards])
        for s, info in enumerate(manifest.shards):
            if rows[s] != info.rows:
                raise ManifestError(f"record-batch index {url}: shard {info.path} has {int(rows[s])} rows in its "
                                    f"record batches, the manifest says {info.rows}")
        if np.any(index.offset + index.length > sizes[shard]) or np.any(index.length <= 0):
            bad = manifest.shards[int(shard[np.argmax((index.offset + index.length > sizes[shard]) |
                                                      (index.length <= 0))])].path
            raise ManifestError(f"record-batch index {url}: a record batch of shard {bad} lies outside the shard")
        return index


def encode_index(ranges: list[list[BatchRange]]) -> bytes:
    """The index file for the shards' record batches (``ranges[s]``: shard s's batches in file order)."""
    flat = [(s, r) for s, shard in enumerate(ranges) for r in shard]
    columns = [
        pa.array([s for s, _ in flat], pa.int32()),
        pa.array([r.offset for _, r in flat], pa.int64()),
        pa.array([r.length for _, r in flat], pa.int64()),
        pa.array([r.rows for _, r in flat], pa.int64()),
        pa.array([r.crc32 for _, r in flat], pa.uint32()),
    ]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_batch(pa.record_batch(columns, schema=SCHEMA))
    return sink.getvalue().to_pybytes()
