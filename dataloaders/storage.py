"""Object storage access: one fsspec filesystem per process and settings, retries with backoff, clear errors.

Credentials and endpoints come the standard ways: AWS env vars / profiles (botocore's own chain),
``AWS_ENDPOINT_URL`` for S3-compatible servers, and fsspec ``storage_options``. The filesystem is never
shared across processes: s3fs/aiobotocore hold an event loop and sockets that do not survive a fork
(s3fs #914, fsspec #835), so every loader worker builds its own, bypassing fsspec's instance cache; within
a process, the readers of one dataset share one.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable, Protocol, TypeVar

import fsspec
import fsspec.asyn
import pyarrow as pa
from fsspec.core import url_to_fs

from dataloaders.errors import StorageAccessError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds a single S3 request may stall before it is abandoned and retried (a stalled socket would
# otherwise hang an epoch forever).
DEFAULT_TIMEOUT_S = 30.0
_NEVER = threading.Event()  # the backoff of reads that cannot be cancelled (never set)


# This process's object-store filesystems, by pid and settings: opening a dataset, its record-batch index and
# its shards in one process share one S3 client (each new one costs a session, a client and a connection).
_PROCESS_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(url: str, storage_options: dict[str, Any] | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[fsspec.AbstractFileSystem, str]:
    """This process's filesystem for ``url`` and these settings, and the path inside it."""
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = endpoint
        config = dict(options.get("config_kwargs", {}))
        config.setdefault("connect_timeout", timeout_s)
        config.setdefault("read_timeout", timeout_s)
        options["config_kwargs"] = config
    options.setdefault("skip_instance_cache", True)
    if protocol not in ("s3", "s3a"):
        return url_to_fs(url, **options)
    # The key holds the pid (a forked child builds its own) and the AWS environment the client was built from.
    key = (os.getpid(), protocol, repr(sorted(options.items())),
           tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    fs = _PROCESS_FILESYSTEMS.get(key)
    if fs is None:
        fs, path = url_to_fs(url, **options)
        _PROCESS_FILESYSTEMS[key] = fs
        return fs, path
    return fs, fs._strip_protocol(url)


def join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}"


def classify(err: BaseException, url: str) -> StorageAccessError | None:
    """A permanent storage error as a user-facing one; None for errors worth retrying."""
    if isinstance(err, FileNotFoundError):
        return StorageAccessError(f"object {url} does not exist (missing shard or wrong dataset URL)")
    if isinstance(err, PermissionError):
        return StorageAccessError(
            f"access to {url} was denied ({err}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE "
            f"or data.storage_options"
        )
    text = str(err)
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "AccessDenied" in text:
        return StorageAccessError(f"access to {url} was denied ({text}); check the credentials")
    return None


def with_retries(action: Callable[[], T], url: str, retries: int, what: str = "read",
                 is_transient: Callable[[BaseException], bool] = lambda e: True,
                 cancel: threading.Event | None = None) -> T:
    """Run ``action``; retry transient failures with exponential backoff (0.1 s doubling, capped at 5 s).
    Once ``cancel`` is set (its reader was closed) no further attempt is made."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - storage clients raise many unrelated types
            permanent = classify(e, url)
            if permanent is not None:
                raise permanent from e
            if not is_transient(e):
                raise
            if attempt == retries:
                raise StorageAccessError(
                    f"could not {what} {url} after {retries + 1} attempts; last error: {type(e).__name__}: {e}"
                ) from e
            delay = min(5.0, 0.1 * 2**attempt) * (0.5 + random.random())
            cancel = cancel or _NEVER
            if not cancel.is_set():
                log.warning("%s %s failed (%s: %s); retry %d/%d in %.2fs", what, url, type(e).__name__, e,
                            attempt + 1, retries, delay)
                if not cancel.wait(delay):
                    continue
            raise StorageAccessError(f"{what} {url} abandoned: its reader was closed ({type(e).__name__}: {e})") from e
    raise AssertionError("unreachable")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, url: str, retries: int,
               cancel: threading.Event | None = None) -> bytes:
    return with_retries(lambda: fs.cat_file(path), url, retries, cancel=cancel)


def read_buffer(fs: fsspec.AbstractFileSystem, path: str, url: str, retries: int,
                cancel: threading.Event | None = None) -> bytes | pa.Buffer:
    """A whole (large) object. A local file is memory-mapped instead of read: one copy fewer per shard,
    which on NVMe or a warm page cache is a third of the loader's memory traffic."""
    if is_local(fs):
        return with_retries(lambda: pa.memory_map(path, "r").read_buffer(), url, retries, cancel=cancel)
    return read_bytes(fs, path, url, retries, cancel)


def read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int, url: str,
               retries: int, cancel: threading.Event | None = None) -> bytes | pa.Buffer:
    """Bytes [start, end) of an object (one ranged GET), fewer if the object is shorter: the caller compares
    the length with what it expected. A local file is memory-mapped."""
    if is_local(fs):
        def local() -> pa.Buffer:
            mapped = pa.memory_map(path, "r")
            mapped.seek(min(start, mapped.size()))
            return mapped.read_buffer(max(0, end - start))
        return with_retries(local, url, retries, cancel=cancel)

    def ranged() -> bytes:
        try:
            return fs.cat_file(path, start=start, end=end)
        except OSError as e:  # 416: the object ends before `start`
            if _unsatisfiable(e):
                return b""
            raise
    return with_retries(ranged, url, retries, cancel=cancel)


class RangeSink(Protocol):
    """Where ``stream_range`` delivers an object's bytes, in order, as they arrive."""

    def begin(self) -> None:
        """An attempt starts: forget whatever an earlier, failed one delivered."""

    def write(self, piece: bytes) -> None:
        """The next bytes of the range (called on the filesystem's event-loop thread: keep it short)."""


STREAM_PIECE = 256 << 10  # bytes handed to a sink at a time, at most


class SinkError(RuntimeError):
    """A sink could not take what a GET returned (a full or unwritable local disk): not the store's fault,
    so never retried, and reported with the sink's own error rather than as a storage one."""


def can_stream(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``stream_range`` can read from ``fs`` (s3fs: its client and event loop are used directly)."""
    return callable(getattr(fs, "_call_s3", None)) and getattr(fs, "loop", None) is not None


def stream_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int, url: str, retries: int,
                 sink: RangeSink, cancel: threading.Event | None = None) -> int:
    """Bytes [start, end) of an object of an s3fs filesystem (``can_stream``), one ranged GET, handed to
    ``sink`` as they arrive (fewer if the object is shorter); the number of bytes delivered. No buffer of
    the whole range is built: the sink writes each piece where it belongs. A failed attempt is retried from
    the range's start, after ``sink.begin()``."""
    bucket, key, version = fs.split_path(path)
    version_kw = {"VersionId": version} if version else {}

    async def get() -> int:
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                         **version_kw)
        except OSError as e:
            if _unsatisfiable(e):
                _deliver(sink.begin)
                return 0
            raise
        body, delivered = response["Body"], 0
        try:
            _deliver(sink.begin)
            while piece := await body.read(STREAM_PIECE):
                _deliver(sink.write, piece)
                delivered += len(piece)
        finally:
            body.close()
        return delivered

    def _deliver(call: Callable, *args: Any) -> None:
        try:
            call(*args)
        except Exception as e:  # noqa: BLE001 - whatever the sink raises is the sink's
            raise SinkError(f"{url}: could not store what the GET returned: {type(e).__name__}: {e}") from e

    return with_retries(lambda: fsspec.asyn.sync(fs.loop, get), url, retries, cancel=cancel,
                        is_transient=lambda e: not isinstance(e, SinkError))


def _unsatisfiable(err: OSError) -> bool:
    """A ranged read that starts past the object's end (HTTP 416)."""
    return "range is not satisfiable" in str(err).lower() or "InvalidRange" in str(err)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return any(p in ("file", "local") for p in _protocols(fs))


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, retries: int = 3) -> None:
    """Write an object so readers see either nothing or all of it.

    An S3 PUT is atomic by itself; on a local or other filesystem write a hidden temporary name first and
    rename it into place.
    """
    if _is_object_store(fs):
        with_retries(lambda: fs.pipe_file(path, data), path, retries, what="write")
        return
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{os.getpid()}-{random.getrandbits(40):x}-{path.rsplit('/', 1)[-1]}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return any(p in ("s3", "s3a", "gs", "gcs", "abfs", "az") for p in _protocols(fs))
