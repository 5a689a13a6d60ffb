"""Write a dataset: Arrow IPC shards plus the manifest, to any fsspec URL.

Usage::

    with DatasetWriter("s3://bucket/digits", shard_rows=256, text_encoder=enc.describe()) as w:
        w.set_empty_condition(tokens, pooled)
        w.write({"sample_id": ids, "latent": x, "text_tokens": t, "text_pooled": p, "caption": caps})

Columns are fixed by the first ``write`` (dtype and per-sample shape; bf16 is kept as bf16). Shard names
carry a random token of this writer, so rewriting a dataset in place never touches the shards the old
manifest points at; the manifest goes last, so an interrupted write leaves the old dataset (or nothing)
readable, never a half-written one.
"""

from __future__ import annotations

import secrets
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from dataloaders import storage
from dataloaders.columns import ColumnSpec, infer_spec, schema_of, to_arrow
from dataloaders.manifest import DEFAULT_CHECKSUM, Manifest, ShardInfo, checksum, manifest_root, manifest_url

REQUIRED = ("sample_id", "latent", "text_tokens", "text_pooled", "caption")


def encode_shard(specs: list[ColumnSpec], columns: Mapping[str, Any]) -> bytes:
    """One shard's bytes: a single-record-batch Arrow IPC file (one contiguous buffer per column)."""
    schema = schema_of(specs)
    batch = pa.record_batch([to_arrow(s, columns[s.name]) for s in specs], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


class DatasetWriter:
    """Buffers samples, flushes shards of ``shard_rows`` rows, writes the manifest on ``close``."""

    def __init__(self, url: str, *, shard_rows: int = 1024, storage_options: dict | None = None,
                 text_encoder: dict | None = None, extra: dict | None = None,
                 require_columns: tuple[str, ...] = REQUIRED, progress: bool | int = False,
                 checksum: str = DEFAULT_CHECKSUM):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.url = manifest_url(url)
        self.root = manifest_root(url)
        self.fs, self._root_path = storage.filesystem(self.root, storage_options)
        self.shard_rows = shard_rows
        self.checksum = checksum
        self.text_encoder = text_encoder or {}
        self.extra = extra or {}
        self.require_columns = require_columns
        self.specs: list[ColumnSpec] | None = None
        self.shards: list[ShardInfo] = []
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
        data = encode_shard(specs, {"text_tokens": text_tokens[None], "text_pooled": text_pooled[None]})
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
        data = encode_shard(self.specs, self._take(rows))
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
        manifest = Manifest(self.specs, self.shards, self.text_encoder, self.empty_condition, self.extra, self.url)
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
