"""Write a dataset: Arrow IPC shards plus the manifest, to any fsspec URL.

Usage::

    with DatasetWriter("s3://bucket/digits", shard_rows=256, text_encoder=enc.describe()) as w:
        w.set_empty_condition(tokens, pooled)
        w.write({"sample_id": ids, "latent": x, "text_tokens": t, "text_pooled": p, "caption": caps})

Columns are fixed by the first ``write`` (dtype and per-sample shape; bf16 is kept as bf16). A shard is
written as record batches of ``batch_rows`` rows (about 8 MiB each by default, the size S3 serves best per
ranged GET); their byte ranges and CRC32s go to the record-batch index (``shards/index.py``), so a reader
can fetch and verify one batch without the rest of the shard. Shard names carry a random token of this
writer, so rewriting a dataset in place never touches the shards the old manifest points at; the index and
then the manifest go last, so an interrupted write leaves the old dataset (or nothing) readable, never a
half-written one.
"""

from __future__ import annotations

import secrets
import zlib
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from dataloaders import storage
from dataloaders.columns import ColumnSpec, infer_spec, schema_of, to_arrow
from dataloaders.manifest import DEFAULT_CHECKSUM, Manifest, ShardInfo, checksum, manifest_root, manifest_url
from dataloaders.shards.index import BatchRange, encode_index

REQUIRED = ("sample_id", "latent", "text_tokens", "text_pooled", "caption")
BATCH_BYTES = 8 << 20  # default record-batch size: S3's advice is 8-16 MB per ranged GET


def encode_shard(specs: list[ColumnSpec], columns: Mapping[str, Any],
                 batch_rows: int | None = None) -> tuple[bytes, list[BatchRange]]:
    """One shard's bytes, an Arrow IPC file of record batches of ``batch_rows`` rows (default: about
    ``BATCH_BYTES`` each), and where each batch's IPC message lies in it."""
    schema = schema_of(specs)
    whole = pa.record_batch([to_arrow(s, columns[s.name]) for s in specs], schema=schema)
    if batch_rows is None:
        batch_rows = max(1, BATCH_BYTES * whole.num_rows // max(1, whole.nbytes))
    sink = pa.BufferOutputStream()
    ends = []
    with pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, whole.num_rows, batch_rows):
            writer.write_batch(whole.slice(start, batch_rows))
            ends.append(sink.tell())
    data = sink.getvalue().to_pybytes()
    # The file writer emits the magic (8 bytes) and the schema message with the first batch.
    starts = [8 + schema.serialize().size] + ends[:-1]
    view = memoryview(data)
    ranges = [BatchRange(a, b - a, min(batch_rows, whole.num_rows - i * batch_rows), zlib.crc32(view[a:b]))
              for i, (a, b) in enumerate(zip(starts, ends))]
    for r in ranges:  # the index must describe what a reader will find: check it here, once
        rows = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)[r.offset:r.offset + r.length]),
                                        schema).num_rows
        if rows != r.rows:
            raise AssertionError(f"record batch at byte {r.offset} decodes to {rows} rows, expected {r.rows}")
    return data, ranges


class DatasetWriter:
    """Buffers samples, flushes shards of ``shard_rows`` rows, writes the manifest on ``close``."""

    def __init__(self, url: str, *, shard_rows: int = 1024, batch_rows: int | None = None,
                 storage_options: dict | None = None, text_encoder: dict | None = None, extra: dict | None = None,
                 require_columns: tuple[str, ...] = REQUIRED, progress: bool | int = False,
                 checksum: str = DEFAULT_CHECKSUM):
        if shard_rows < 1 or (batch_rows is not None and batch_rows < 1):
            raise ValueError(f"shard_rows and batch_rows must be >= 1, got {shard_rows} and {batch_rows}")
        self.url = manifest_url(url)
        self.root = manifest_root(url)
        self.fs, self._root_path = storage.filesystem(self.root, storage_options)
        self.shard_rows = shard_rows
        self.batch_rows = batch_rows
        self.checksum = checksum
        self.text_encoder = text_encoder or {}
        self.extra = extra or {}
        self.require_columns = require_columns
        self.specs: list[ColumnSpec] | None = None
        self.shards: list[ShardInfo] = []
        self.batch_ranges: list[list[BatchRange]] = []  # per shard
        self.empty_condition: ShardInfo | None = None
        self._token = secrets.token_hex(4)
        self._pending: dict[str, list] = {}
        self._pending_rows = 0
        self._closed = False
        total = progress if isinstance(progress, int) and not isinstance(progress, bool) else None
        self._bar = tqdm(total=total, unit="sample", desc=f"writing {self.root}") if progress else None

    # ----------------------------------------------------------------------------------------- input
    def write(self, columns: Mapping[str, Any]) -> None:
        """Append a batch of samples: every column with the same leading (sample) dimension."""
        if self.specs is None:
            self.specs = [infer_spec(name, values) for name, values in columns.items()]
            missing = [c for c in self.require_columns if c not in columns]
            if missing:
                raise ValueError(f"dataset {self.url}: the first batch lacks column(s) {missing}")
        names = [s.name for s in self.specs]
        if sorted(columns) != sorted(names):
            raise ValueError(f"dataset {self.url}: batch has columns {sorted(columns)}, the dataset {sorted(names)}")
        lengths = {name: len(v) for name, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"dataset {self.url}: columns of one batch differ in length: {lengths}")
        n = next(iter(lengths.values()))
        for spec in self.specs:
            to_arrow(spec, columns[spec.name][:1])  # raises naming the column if dtype/shape changed
            self._pending.setdefault(spec.name, []).append(columns[spec.name])
        self._pending_rows += n
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)
        if self._bar is not None:
            self._bar.update(n)

    def set_empty_condition(self, text_tokens: Any, text_pooled: Any) -> None:
        """Store the encoding of the empty caption "" ((L, C) tokens, (C,) pooled) with the dataset."""
        specs = [infer_spec("text_tokens", text_tokens[None]), infer_spec("text_pooled", text_pooled[None])]
        data, _ = encode_shard(specs, {"text_tokens": text_tokens[None], "text_pooled": text_pooled[None]})
        self.empty_condition = self._put(f"empty_condition-{self._token}.arrow", data, rows=1)

    # ---------------------------------------------------------------------------------------- output
    def _take(self, rows: int) -> dict[str, Any]:
        """The first ``rows`` pending rows of every column, leaving the rest pending."""
        out = {}
        for name, parts in self._pending.items():
            if isinstance(parts[0], (list, tuple)):
                flat = [x for p in parts for x in p]
                out[name], rest = flat[:rows], flat[rows:]
            else:
                joined = _concat(parts)
                out[name], rest = joined[:rows], joined[rows:]
            self._pending[name] = [rest] if len(rest) else []
        self._pending_rows -= rows
        return out

    def _flush(self, rows: int) -> None:
        data, ranges = encode_shard(self.specs, self._take(rows), self.batch_rows)
        self.batch_ranges.append(ranges)
        self.shards.append(self._put(f"shards/{self._token}-{len(self.shards):06d}.arrow", data, rows))

    def _put(self, relative: str, data: bytes, rows: int) -> ShardInfo:
        storage.write_bytes_atomic(self.fs, storage.join(self._root_path, relative), data)
        return ShardInfo(relative, rows, len(data), checksum(data, self.checksum))

    def close(self) -> Manifest:
        """Flush the last shard and publish the manifest: only now is the dataset readable."""
        if self._closed:
            raise RuntimeError(f"dataset writer for {self.url} is already closed")
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not self.shards:
            raise ValueError(f"dataset {self.url}: no samples were written")
        index = self._put(f"record_batches-{self._token}.arrow", encode_index(self.batch_ranges),
                          rows=sum(map(len, self.batch_ranges)))
        manifest = Manifest(self.specs, self.shards, self.text_encoder, self.empty_condition, self.extra, self.url,
                            record_batch_index=index)
        storage.write_bytes_atomic(self.fs, storage.join(self._root_path, self.url.rsplit("/", 1)[1]),
                                   manifest.to_json().encode())
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        return manifest

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()  # no manifest: the partial shards are never readable as a dataset


def _concat(parts: list) -> Any:
    import torch

    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]
