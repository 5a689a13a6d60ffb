"""A node's cache of verified record batches on local disk, shared by all its ranks and loader workers.

One download per node: before fetching a record batch, a process creates its claim file (``O_EXCL``, so
exactly one process wins); the others wait until the entry appears under its final name. Entries are
written to a temporary name and renamed into place, so a half-written entry is never read. From an object
store they are written as the GET's body arrives (``StagingSink``), so no buffer of the whole GET is built;
a process that dies while writing leaves its temporary files to the next one that opens the cache. A claim
whose owner died (same host, dead pid) or that outlives ``stale_after_s`` is given up: the waiter fetches the
batch itself (at worst a second download, never a wrong byte). The directory is keyed by the dataset's
manifest fingerprint, so two datasets, or two versions of one, never collide.

When ``max_bytes`` bounds the cache, eviction follows the known future order: the entries whose next use
by this node is farthest away go first (Belady's rule; ``next_use`` comes from ``GlobalOrder``), entries of
partitions the node does not serve before all others. Eviction runs when this process's estimate of the
total crosses the budget and brings it down to 90 % of it, so the directory is listed rarely; another
process's writes since the last listing can overshoot the budget briefly. An entry evicted while a reader
has it memory-mapped stays readable to that reader (unlink removes the name, not the mapping).

Readers verify what they map, but only entries older than their cache: an entry published since this
process opened the cache was verified by the live process that wrote it, and a copy corrupted at rest
(bit rot, a crash before the data reached the disk) is older than that. ``trusted`` tells which; ``vouch``
marks an older entry as verified once it has been checked, so that it is checked once per run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

_HOST = socket.gethostname()
OWNER = "owner"  # a temporary cache directory's file naming its owner process: "host pid"
_TEMPORARY = f".tmp-{_HOST}@"  # prefix of this host's entries being written, then "<pid>-" ("@": no hostname has it)


class BatchCache:
    def __init__(self, directory: str, fingerprint: str, max_bytes: int = 0, stale_after_s: float = 120.0):
        self.dir = Path(directory).expanduser() / fingerprint[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes  # 0 = unbounded
        self.stale_after_s = stale_after_s
        # record batch ids -> distance to their next use (inf: not needed by this node); None: oldest first
        self.next_use: Callable[[np.ndarray], np.ndarray] | None = None
        self._estimate: int | None = None  # bytes in the cache as this process last counted, plus its own puts
        self._budget_lock = threading.Lock()
        self.opened = time.time()  # entries modified since were written (verified) by live processes
        self._remove_orphans()


    def _path(self, batch: int) -> Path:
        return self.dir / f"{batch:09d}.arrow-batch"

    def _claim_path(self, batch: int) -> Path:
        return self.dir / f".claim-{batch:09d}"

    def get(self, batch: int) -> pa.Buffer | None:
        """The cached record batch, memory-mapped, or None."""
        try:
            return pa.memory_map(str(self._path(batch)), "r").read_buffer()
        except FileNotFoundError:
            return None

    def trusted(self, batch: int) -> bool:
        """Whether the entry was published (or vouched for) since this cache was opened: verified then, by
        a process of this run. False if it is gone."""
        try:
            return self._path(batch).stat().st_mtime >= self.opened
        except FileNotFoundError:
            return False

    def vouch(self, batch: int) -> None:
        """Mark an entry this process has verified as trusted for the rest of the run."""
        try:
            os.utime(self._path(batch))
        except FileNotFoundError:
            pass

    def has(self, batch: int) -> bool:
        """Whether a complete entry is there (not verified: readers check what they map)."""
        return self._path(batch).exists()

    def claim(self, batch: int) -> bool:
        """True if this process is now the one to fetch ``batch`` (then ``put`` or ``release`` it)."""
        for _ in range(2):
            try:
                fd = os.open(self._claim_path(batch), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(batch):
                    return False
                self._claim_path(batch).unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{_HOST} {os.getpid()}")
            if self._path(batch).exists():  # finished by another process between its get and our claim
                self.release(batch)
                return False
            return True
        return False

    def _stale(self, batch: int) -> bool:
        path = self._claim_path(batch)
        try:
            owner = path.read_text().split()
            age = time.time() - path.stat().st_mtime
        except (FileNotFoundError, ValueError):
            return False  # released meanwhile (or still being written): look again
        if age > self.stale_after_s:
            return True
        return owner_gone(owner)

    def wait(self, batch: int) -> pa.Buffer | None:
        """The entry another process has claimed, once it is there; None if that process gave up or died
        (or ``stale_after_s`` passed): the caller then fetches it itself."""
        delay, deadline = 0.002, time.monotonic() + self.stale_after_s
        while time.monotonic() < deadline:
            data = self.get(batch)
            if data is not None:
                return data
            if not self._claim_path(batch).exists() or self._stale(batch):
                return self.get(batch)
            time.sleep(delay)
            delay = min(0.05, delay * 2)
        return None

    def put(self, batch: int, data: bytes | pa.Buffer | Staged) -> None:
        """Publish a verified record batch (by rename; a staged one is renamed from where it was written) and
        drop this process's claim on it."""
        try:
            if self.max_bytes and len(data) > self.max_bytes:
                self.unstage(data)
                return  # larger than the whole budget: never cached
            path = self._path(batch)
            if isinstance(data, Staged):
                try:
                    os.replace(data.path, path)
                except FileNotFoundError:  # removed by another process meanwhile: the caller has it mapped
                    return
            else:
                tmp = self._temporary(batch)
                write_in_pieces(tmp, data)
                os.replace(tmp, path)
        finally:
            self.release(batch)
        if self.max_bytes:
            with self._budget_lock:  # this process's threads put concurrently
                self._estimate = None if self._estimate is None else self._estimate + len(data)
                if self._estimate is None or self._estimate > self.max_bytes:
                    self.evict(keep=batch)

    def _temporary(self, batch: int) -> Path:
        """A fresh name for an entry being written: hidden, and unique to this host, process and call."""
        return self.dir / f"{_TEMPORARY}{os.getpid()}-{secrets.token_hex(4)}-{self._path(batch).name}"

    def _remove_orphans(self) -> None:
        """Delete the temporary files of this host's processes that died while writing (a killed rank or
        worker): nothing else would, and a GET's batches stay staged while it streams. Only files untouched
        for ``stale_after_s``: a process of another PID namespace (a container sharing the directory under
        the same hostname) may look dead and still be writing."""
        now = time.time()
        for entry in os.scandir(self.dir):
            if entry.name.startswith(_TEMPORARY):
                pid = entry.name[len(_TEMPORARY):].split("-", 1)[0]
                try:
                    idle = now - entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if idle > self.stale_after_s and owner_gone([_HOST, pid]):
                    Path(entry.path).unlink(missing_ok=True)

    def stager(self, pieces: list[tuple[int, int, int]]) -> StagingSink:
        """A sink for one ranged GET (``storage.stream_range``) covering the record batches ``pieces``:
        (batch, its offset in the range, its length), in offset order."""
        return StagingSink(self, pieces)

    @staticmethod
    def unstage(data: object) -> None:
        """Remove a staged entry that will not be published (a no-op for anything else)."""
        if isinstance(data, Staged):
            data.path.unlink(missing_ok=True)

    def release(self, batch: int) -> None:
        self._claim_path(batch).unlink(missing_ok=True)

    def discard(self, batch: int) -> None:
        """Remove an entry that failed verification."""
        self._path(batch).unlink(missing_ok=True)

    def entries(self) -> dict[int, int]:
        """Record batch id -> bytes of every complete entry."""
        out = {}
        for entry in os.scandir(self.dir):
            if entry.name.endswith(".arrow-batch") and not entry.name.startswith("."):
                try:
                    out[int(entry.name.split(".", 1)[0])] = entry.stat().st_size
                except FileNotFoundError:
                    pass
        return out

    def evict(self, keep: int | None = None) -> None:
        """Delete the entries needed farthest in the future until the cache holds 90 % of ``max_bytes``."""
        entries = self.entries()
        total = sum(entries.values())
        if total > self.max_bytes:
            ids = np.fromiter(entries, np.int64, len(entries))
            distance = self.next_use(ids) if self.next_use is not None else np.zeros(len(ids))
            for i in np.argsort(-distance, kind="stable"):
                if total <= 0.9 * self.max_bytes:
                    break
                if ids[i] == keep:
                    continue
                self.discard(int(ids[i]))
                total -= entries[int(ids[i])]
        self._estimate = total

    def size_bytes(self) -> int:
        return sum(self.entries().values())


@dataclass(eq=False)
class Staged:
    """A fetched record batch written to a temporary file of the cache as its bytes arrived: ``buffer`` maps
    it, ``crc32`` was computed on the way. ``BatchCache.put`` publishes it by rename, ``unstage`` drops it."""

    path: Path
    buffer: pa.Buffer
    crc32: int

    def __len__(self) -> int:
        return len(self.buffer)


class StagingSink:
    """Writes the record batches one ranged GET covers to temporary files of the cache as the bytes arrive,
    so that no buffer of the whole range is built (the GET's body goes from the socket to the page cache in
    pieces); bytes outside the batches (a shard's footer) are dropped. ``finish`` maps what was written."""

    def __init__(self, cache: BatchCache, pieces: list[tuple[int, int, int]]):
        self.cache = cache
        self.pieces = pieces  # (batch, offset in the range, length), in offset order
        self.written: list[tuple[Path, int, int]] = []  # per piece begun: its file, bytes and running CRC32
        self.pos = 0  # bytes of the range received
        self.fd = -1  # the file of the piece being written (the last of ``written``)

    def begin(self) -> None:
        self.discard()
        self.written, self.pos = [], 0

    def write(self, piece: bytes) -> None:
        view, lo = memoryview(piece), self.pos
        hi = self.pos = lo + len(view)
        while len(self.written) < len(self.pieces) or self.fd >= 0:
            if self.fd < 0:  # the next batch's first byte: is it in this piece?
                batch, offset, length = self.pieces[len(self.written)]
                if offset >= hi:
                    return
                path = self.cache._temporary(batch)
                self.fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                self.written.append((path, 0, 0))
            batch, offset, length = self.pieces[len(self.written) - 1]
            path, done, crc = self.written[-1]
            part = view[max(offset + done, lo) - lo:min(offset + length, hi) - lo]
            n = 0
            while n < len(part):
                n += os.write(self.fd, part[n:])
            self.written[-1] = (path, done + n, zlib.crc32(part, crc))
            if done + n < length:
                return  # the rest of this batch comes in later pieces
            os.close(self.fd)
            self.fd = -1

    def finish(self) -> dict[int, Staged]:
        """Each batch's staged entry (shorter than its length if the object ended early)."""
        self._close()
        out = {}
        for k, (batch, _, _) in enumerate(self.pieces):
            if k < len(self.written):
                path, done, crc = self.written[k]
                buffer = pa.memory_map(str(path), "r").read_buffer() if done else pa.py_buffer(b"")
            else:  # nothing of it arrived
                path, crc, buffer = self.cache._temporary(batch), 0, pa.py_buffer(b"")
            out[batch] = Staged(path, buffer, crc)
        return out

    def discard(self) -> None:
        """Remove every file written so far (a failed attempt, or one that is abandoned)."""
        self._close()
        for path, _, _ in self.written:
            path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


WRITE_PIECE = 256 << 10


def write_in_pieces(path: Path, data: bytes | pa.Buffer) -> None:
    """Write ``data`` to a new file ``path`` in writes of ``WRITE_PIECE`` bytes. On the VM the loader was
    measured on (virtio-balloon free page reporting), writing 1 GB in 8 MiB writes cost two to four times
    the system time of 256 KiB writes, likely because large writes get large page-cache folios, carved from
    blocks the host had taken back (``benchmarks/cache_writes.py``, docs/PERFORMANCE.md)."""
    view = memoryview(data)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:done + WRITE_PIECE])
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
        raise
    os.close(fd)


def owner_gone(owner: list[str]) -> bool:
    """Whether the process named by ``[host, pid]`` (a claim's or a temporary cache's owner) has died: only
    known for a process of this host."""
    if len(owner) != 2 or owner[0] != _HOST:
        return False
    try:
        os.kill(int(owner[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        pass
    return False


_UNOWNED_AFTER_S = 600.0  # a temporary cache without its owner file for this long is left over


def temporary_cache(prefix: str = "flowscale-loader-") -> str:
    """A new temporary cache directory owned by this process; first removes those whose owner on this host
    died (a killed rank cannot remove its own), and those without an owner file for ``_UNOWNED_AFTER_S``."""
    parent = Path(tempfile.gettempdir())
    for entry in parent.glob(f"{prefix}*"):
        try:
            gone = owner_gone((entry / OWNER).read_text().split())
        except FileNotFoundError:
            # still being created, or what a fetch still streaming wrote after its owner removed it
            try:
                gone = entry.is_dir() and time.time() - entry.stat().st_mtime > _UNOWNED_AFTER_S
            except FileNotFoundError:
                continue
        except (NotADirectoryError, PermissionError):
            continue  # not one of ours
        if gone:
            shutil.rmtree(entry, ignore_errors=True)
    directory = tempfile.mkdtemp(prefix=prefix, dir=parent)
    (Path(directory) / OWNER).write_text(f"{_HOST} {os.getpid()}")
    return directory
