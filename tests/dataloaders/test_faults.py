"""Storage faults (errors, resets, stalls, truncated bodies) on a third of the requests: the epoch
still completes, every sample exactly once with the columns written for it, and nothing hangs. The
fault proxy itself counts a fault only once it has reached the client."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from urllib.parse import urlparse

import boto3
import pytest

from dataloaders import open_dataset
from dataloaders.dataset import ReadOptions
from dataloaders.errors import StorageAccessError
from dataloaders.shards.reader import ShardReader
from tests.dataloaders.conftest import assert_rows_match_ids, write_small
from tests.dataloaders.fault_proxy import FAULTS, FaultProxy


@pytest.fixture
def deadline():
    """Fail, rather than hang, if the epoch is not done in time."""
    def expire(*_):
        raise TimeoutError("the loader hung behind the faulty proxy")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(150)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_completes_exactly_once_through_faults(s3_bucket, s3_env, deadline, workers):
    url = write_small(f"{s3_bucket}/ds", n=160, shard_rows=10)  # written straight to the server
    with FaultProxy(s3_env, period=3, stall_s=3.0) as proxy:
        options = {"endpoint_url": proxy.url}
        ds = open_dataset(url, storage_options=options, retries=8, timeout_s=1.0)
        read = ReadOptions(storage_options=options, retries=8, timeout_s=1.0, fetch_threads=4)
        loader = ds.loader(rank=0, world_size=1, global_batch_size=40, seed=0, shuffle_block_size=40,
                           num_workers=workers, prefetch=2, read=read)
        stream = iter(loader)
        batches = [next(stream) for _ in range(4)]
        loader.close()
    for batch in batches:
        assert_rows_match_ids(batch)
    assert sorted(i for batch in batches for i in batch["sample_id"].tolist()) == list(range(160))
    assert all(proxy.injected[f] >= 1 for f in FAULTS), proxy.injected


def _request(url: str, method: str, path: str) -> tuple[int, bytes, str] | str:
    """(status, body, Content-Length) of one request on a fresh connection, or the error's type name."""
    address = urlparse(url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Length")
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


def _counts(proxy: FaultProxy, expected: dict) -> dict:
    """The proxy's counts once they equal ``expected``, or as they are after 5 s: a fault is counted just
    after it is served, which can be after the client has seen it."""
    deadline = time.monotonic() + 5
    while dict(proxy.injected) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return dict(proxy.injected)


def test_proxy_counts_a_fault_once_it_reached_the_client(s3_bucket, s3_env):
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3", endpoint_url=s3_env).put_object(Bucket=bucket, Key="object", Body=b"x" * 1000, ACL="public-read")
    whole = (200, b"x" * 1000, "1000")
    plan = [  # every 2nd request gets the next fault of the rotation
        ("GET", whole, {}),
        ("GET", lambda out: out[0] == 503, {"error": 1}),
        ("GET", whole, {"error": 1}),
        ("GET", lambda out: isinstance(out, str), {"error": 1, "reset": 1}),
        ("GET", whole, {"error": 1, "reset": 1}),
        ("GET", lambda out: isinstance(out, str), {"error": 1, "reset": 1, "stall": 1}),
        ("GET", whole, {"error": 1, "reset": 1, "stall": 1}),
        ("HEAD", (200, b"", "1000"), {"error": 1, "reset": 1, "stall": 1}),  # no body to cut: not served
        ("GET", "IncompleteRead", {"error": 1, "reset": 1, "stall": 1, "truncate": 1}),  # the next body is
        ("GET", lambda out: out[0] == 503, {"error": 2, "reset": 1, "stall": 1, "truncate": 1}),
    ]
    with FaultProxy(s3_env, period=2, stall_s=0.2) as proxy:
        for i, (method, expected, counts) in enumerate(plan, 1):
            out = _request(proxy.url, method, f"/{bucket}/object")
            assert expected(out) if callable(expected) else out == expected, f"request {i} ({method}): {out!r}"
            assert _counts(proxy, counts) == counts, f"after request {i} ({method})"


def test_a_closed_reader_stops_retrying_a_failing_store(s3_bucket):
    ds = open_dataset(write_small(f"{s3_bucket}/ds", n=32, shard_rows=16))
    with socket.socket() as s:  # a port nothing listens on: every read fails, and would be retried
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    reader = ShardReader(ds.manifest, ds.record_batches(), {"endpoint_url": dead}, retries=8, timeout_s=1.0)
    outcome = []

    def read() -> None:
        try:
            reader.read_batches([0])
        except StorageAccessError as e:
            outcome.append((str(e), time.monotonic()))

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(0.5)
    closed = time.monotonic()
    reader.close()
    # One attempt (s3fs and botocore retry a refused connection inside it) takes about 5 s here; all 9
    # would take about a minute, backoff included. The attempt in flight at close() is not cut short.
    thread.join(timeout=40)
    assert not thread.is_alive() and outcome, "the read went on retrying after close"
    message, ended = outcome[0]
    assert "its reader was closed" in message and ds.manifest.shards[0].path in message
    assert ended - closed < 15, ended - closed
