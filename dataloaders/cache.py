"""A local shard cache on disk, bounded in bytes, shared by every process of a host.

Files are written to a temporary name and renamed into place, so concurrent ranks and workers of one node
can share a cache directory (one download serves all of them) without ever reading a partial file. The
directory is keyed by the dataset's manifest fingerprint, so two datasets, or two versions of one, never
collide. Eviction removes the least recently used shards (mtime, refreshed on every hit) until the cache
fits its budget; a shard evicted under a reader's feet is simply fetched again.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pyarrow as pa


class ShardCache:
    def __init__(self, directory: str, fingerprint: str, max_bytes: int = 0):
        self.dir = Path(directory).expanduser() / fingerprint[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes  # 0 = unbounded

    def _path(self, relative: str) -> Path:
        return self.dir / relative.replace("/", "__")

    def get(self, relative: str) -> pa.Buffer | None:
        """The cached shard, memory-mapped (an eviction meanwhile unlinks the name, not the mapping)."""
        path = self._path(relative)
        try:
            data = pa.memory_map(str(path), "r").read_buffer()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # most recently used
        except FileNotFoundError:
            pass
        return data

    def put(self, relative: str, data: bytes | pa.Buffer) -> None:
        if self.max_bytes and len(data) > self.max_bytes:
            return  # a shard larger than the whole budget is never cached
        path = self._path(relative)
        tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        if self.max_bytes:
            self.evict(keep=path)

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used shards until the cache fits ``max_bytes`` (never ``keep``)."""
        entries = []
        for p in self.dir.iterdir():
            if p.name.startswith(".tmp-"):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            try:
                p.unlink()
                total -= size
            except FileNotFoundError:
                pass

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if not p.name.startswith(".tmp-"))
