"""A node's cache of verified record batches on local disk, shared by all its ranks and loader workers.

One download per node: before fetching a record batch, a process creates its claim file (``O_EXCL``, so
exactly one process wins); the others wait until the entry appears under its final name. Entries are
written to a temporary name and renamed into place, so a half-written entry is never read. A claim whose
owner died (same host, dead pid) or that outlives ``stale_after_s`` is given up: the waiter fetches the
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
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

_HOST = socket.gethostname()
OWNER = "owner"  # a temporary cache directory's file naming its owner process: "host pid"


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

    def put(self, batch: int, data: bytes | pa.Buffer) -> None:
        """Publish a verified record batch (by rename) and drop this process's claim on it."""
        try:
            if self.max_bytes and len(data) > self.max_bytes:
                return  # larger than the whole budget: never cached
            path = self._path(batch)
            tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            self.release(batch)
        if self.max_bytes:
            with self._budget_lock:  # this process's threads put concurrently
                self._estimate = None if self._estimate is None else self._estimate + len(data)
                if self._estimate is None or self._estimate > self.max_bytes:
                    self.evict(keep=batch)

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


def temporary_cache(prefix: str = "flowscale-loader-") -> str:
    """A new temporary cache directory owned by this process; first removes those whose owner on this host
    died (a killed rank cannot remove its own)."""
    parent = Path(tempfile.gettempdir())
    for entry in parent.glob(f"{prefix}*"):
        try:
            gone = owner_gone((entry / OWNER).read_text().split())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # not one of ours, or still being created
        if gone:
            shutil.rmtree(entry, ignore_errors=True)
    directory = tempfile.mkdtemp(prefix=prefix, dir=parent)
    (Path(directory) / OWNER).write_text(f"{_HOST} {os.getpid()}")
    return directory
